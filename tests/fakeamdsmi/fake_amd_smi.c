/* A fake libamd_smi.so for tests, loaded by the real `amdsmi` Python package.
 *
 * The package binds ~190 symbols when it is imported (amdsmi_wrapper.py); those llem does not
 * call are generated as stubs answering AMDSMI_STATUS_NOT_SUPPORTED (stubs.c, written by
 * lib.py from the installed wrapper). This file implements the calls llem makes, with the
 * exact struct layouts of amdsmi 7.x. The GPUs come from the file named by FAKE_AMDSMI_STATE,
 * re-read on every call so that tests advance counters by rewriting it:
 *
 *   init_error=0
 *   gpu bdf=0000:c1:00.0 uuid=5bff74bf-0000-1000-80ba-c1f3a1b2c3d4 card=1 acc=123456
 *       res=15.3 power_w=300 error=0
 *
 * (one `gpu` line per GPU, in processor-handle order; `error` is an amdsmi_status_t answered
 * by the energy and power calls).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define AMDSMI_STATUS_SUCCESS 0
#define AMDSMI_STATUS_INVAL 1
#define AMDSMI_STATUS_NOT_SUPPORTED 2
#define AMDSMI_STATUS_INSUFFICIENT_SIZE 15
#define MAX_GPUS 16

typedef struct {
    unsigned dom, bus, dev, fn;
    char uuid[64];
    unsigned card;
    uint64_t acc;
    float res;
    unsigned power_w;
    int error;
} gpu_t;

static gpu_t gpus[MAX_GPUS];
static int ngpus;
static int init_error;
static int initialised;

static void load(void) {
    const char *path = getenv("FAKE_AMDSMI_STATE");
    FILE *f = path ? fopen(path, "r") : NULL;
    char line[512];
    ngpus = 0;
    init_error = 0;
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "init_error=%d", &init_error) == 1) continue;
        if (strncmp(line, "gpu ", 4) != 0 || ngpus >= MAX_GPUS) continue;
        gpu_t *g = &gpus[ngpus];
        memset(g, 0, sizeof *g);
        unsigned long long acc = 0;
        if (sscanf(line, "gpu bdf=%x:%x:%x.%x uuid=%63s card=%u acc=%llu res=%f power_w=%u "
                         "error=%d", &g->dom, &g->bus, &g->dev, &g->fn, g->uuid, &g->card, &acc,
                   &g->res, &g->power_w, &g->error) == 10) {
            g->acc = acc;
            ngpus++;
        }
    }
    fclose(f);
}

/* Handles are 1-based indexes cast to pointers; the socket handle is one per GPU. */
static gpu_t *gpu_of(void *handle) {
    uintptr_t i = (uintptr_t)handle;
    load();
    return (i >= 1 && (int)i <= ngpus) ? &gpus[i - 1] : NULL;
}

int amdsmi_init(uint64_t flags) {
    (void)flags;
    load();
    if (init_error) return init_error;
    initialised = 1;
    return AMDSMI_STATUS_SUCCESS;
}

int amdsmi_shut_down(void) {
    initialised = 0;
    return AMDSMI_STATUS_SUCCESS;
}

static int list(uint32_t *count, void **out) {
    if (!initialised) return 32; /* AMDSMI_STATUS_NOT_INIT */
    load();
    if (out == NULL) {
        *count = (uint32_t)ngpus;
        return AMDSMI_STATUS_SUCCESS;
    }
    if (*count < (uint32_t)ngpus) return AMDSMI_STATUS_INSUFFICIENT_SIZE;
    for (int i = 0; i < ngpus; i++) out[i] = (void *)(uintptr_t)(i + 1);
    *count = (uint32_t)ngpus;
    return AMDSMI_STATUS_SUCCESS;
}

int amdsmi_get_socket_handles(uint32_t *count, void **sockets) {
    if (!initialised) return 32;
    if (sockets == NULL) {
        *count = 1;
        return AMDSMI_STATUS_SUCCESS;
    }
    sockets[0] = (void *)(uintptr_t)1;
    *count = 1;
    return AMDSMI_STATUS_SUCCESS;
}

int amdsmi_get_processor_handles(void *socket, uint32_t *count, void **handles) {
    (void)socket;
    return list(count, handles);
}

int amdsmi_get_gpu_device_bdf(void *handle, uint64_t *bdf) {
    gpu_t *g = gpu_of(handle);
    if (!g) return AMDSMI_STATUS_INVAL;
    *bdf = (uint64_t)(g->fn & 7) | ((uint64_t)(g->dev & 31) << 3) |
           ((uint64_t)(g->bus & 255) << 8) | ((uint64_t)g->dom << 16);
    return AMDSMI_STATUS_SUCCESS;
}

int amdsmi_get_gpu_device_uuid(void *handle, uint32_t *len, char *uuid) {
    gpu_t *g = gpu_of(handle);
    if (!g) return AMDSMI_STATUS_INVAL;
    size_t n = strlen(g->uuid);
    if (*len < n + 1) return AMDSMI_STATUS_INSUFFICIENT_SIZE;
    memcpy(uuid, g->uuid, n + 1);
    *len = (uint32_t)n;
    return AMDSMI_STATUS_SUCCESS;
}

int amdsmi_get_energy_count(void *handle, uint64_t *acc, float *res, uint64_t *ts) {
    gpu_t *g = gpu_of(handle);
    if (!g) return AMDSMI_STATUS_INVAL;
    if (g->error) return g->error;
    *acc = g->acc;
    *res = g->res;
    *ts = 0;
    return AMDSMI_STATUS_SUCCESS;
}

/* amdsmi_power_info_t, packed: socket_power u64, current u32, average u32, 3 x u64 voltages,
 * power_limit u32, 4 bytes padding, 18 x u64 reserved. */
#pragma pack(push, 1)
typedef struct {
    uint64_t socket_power;
    uint32_t current_socket_power;
    uint32_t average_socket_power;
    uint64_t gfx_voltage, soc_voltage, mem_voltage;
    uint32_t power_limit;
    unsigned char padding[4];
    uint64_t reserved[18];
} power_info_t;
#pragma pack(pop)

int amdsmi_get_power_info(void *handle, power_info_t *info) {
    gpu_t *g = gpu_of(handle);
    if (!g) return AMDSMI_STATUS_INVAL;
    if (g->error) return g->error;
    memset(info, 0, sizeof *info);
    info->socket_power = g->power_w;
    info->current_socket_power = g->power_w;
    info->average_socket_power = g->power_w;
    info->power_limit = 0xFFFF;
    return AMDSMI_STATUS_SUCCESS;
}

void amdsmi_free_name_value_pairs(void *p) { (void)p; }

/* amdsmi_enumeration_info_t: drm_render, drm_card, hsa_id, hip_id (u32), hip_uuid char[256]. */
typedef struct {
    uint32_t drm_render, drm_card, hsa_id, hip_id;
    char hip_uuid[256];
} enumeration_info_t;

int amdsmi_get_gpu_enumeration_info(void *handle, enumeration_info_t *info) {
    gpu_t *g = gpu_of(handle);
    if (!g) return AMDSMI_STATUS_INVAL;
    memset(info, 0, sizeof *info);
    info->drm_render = 128 + g->card;
    info->drm_card = g->card;
    info->hsa_id = g->card;
    info->hip_id = (uint32_t)((uintptr_t)handle - 1);
    snprintf(info->hip_uuid, sizeof info->hip_uuid, "GPU-%.16s", g->uuid);
    return AMDSMI_STATUS_SUCCESS;
}
