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
 *       res=15.3 power_w=300 error=0 perror=0 serial=ABC123 part=0 product=AMD_Instinct_MI250X
 *       kind=mi250x
 *
 * (one `gpu` line per GPU, in processor-handle order, `key=value` words; `error` is an
 * amdsmi_status_t answered by the energy call, `perror` by the power call; `serial` is the
 * board's product serial, `part` the KFD partition id, `product` the board's product name with
 * `_` for spaces).
 *
 * `kind` reproduces the multi-die quirks, whatever the line's own counter and power say:
 *   mi250x  an MI250X is one package with two dies (GCDs), seen as two GPUs sharing a board
 *           serial; only the first die reports: the second one's energy accumulator stays 0
 *           and its power fields read 0xFFFF (the package's "N/A").
 *   mi300x  an MI300X in a compute partition mode (DPX/QPX/CPX) is seen as 2-8 GPUs sharing a
 *           board serial; only partition 0 reports: the others answer
 *           AMDSMI_STATUS_NOT_SUPPORTED to the energy and power calls.
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
    int perror;
    char serial[64];
    unsigned part;
    char product[64];
    char kind[16];
    int silent; /* 1: the mi250x second die, 2: an mi300x partition other than 0 */
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
        g->res = 15.3f;
        int have_bdf = 0;
        char *save = NULL;
        for (char *w = strtok_r(line + 4, " \t\n", &save); w; w = strtok_r(NULL, " \t\n", &save)) {
            char *eq = strchr(w, '=');
            if (!eq) continue;
            *eq = 0;
            const char *v = eq + 1;
            if (!strcmp(w, "bdf"))
                have_bdf = sscanf(v, "%x:%x:%x.%x", &g->dom, &g->bus, &g->dev, &g->fn) == 4;
            else if (!strcmp(w, "uuid")) snprintf(g->uuid, sizeof g->uuid, "%s", v);
            else if (!strcmp(w, "card")) g->card = (unsigned)strtoul(v, NULL, 10);
            else if (!strcmp(w, "acc")) g->acc = strtoull(v, NULL, 10);
            else if (!strcmp(w, "res")) g->res = strtof(v, NULL);
            else if (!strcmp(w, "power_w")) g->power_w = (unsigned)strtoul(v, NULL, 10);
            else if (!strcmp(w, "error")) g->error = atoi(v);
            else if (!strcmp(w, "perror")) g->perror = atoi(v);
            else if (!strcmp(w, "serial")) snprintf(g->serial, sizeof g->serial, "%s", v);
            else if (!strcmp(w, "part")) g->part = (unsigned)strtoul(v, NULL, 10);
            else if (!strcmp(w, "product")) snprintf(g->product, sizeof g->product, "%s", v);
            else if (!strcmp(w, "kind")) snprintf(g->kind, sizeof g->kind, "%s", v);
        }
        if (!have_bdf) continue;
        for (char *c = g->product; *c; c++)
            if (*c == '_') *c = ' ';
        if (!strcmp(g->kind, "mi300x") && g->part != 0) g->silent = 2;
        if (!strcmp(g->kind, "mi250x"))
            for (int j = 0; j < ngpus; j++)
                if (!strcmp(gpus[j].serial, g->serial)) g->silent = 1;
        ngpus++;
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
    if (g->silent == 2) return AMDSMI_STATUS_NOT_SUPPORTED;
    if (g->error) return g->error;
    *acc = g->silent == 1 ? 0 : g->acc;
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
    if (g->silent == 2) return AMDSMI_STATUS_NOT_SUPPORTED;
    if (g->perror) return g->perror;
    memset(info, 0, sizeof *info);
    unsigned w = g->silent == 1 ? 0xFFFF : g->power_w;
    info->socket_power = w;
    info->current_socket_power = w;
    info->average_socket_power = w;
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

/* amdsmi_board_info_t, packed: model_number, product_serial, fru_id, product_name,
 * manufacturer_name (char[256] each), 64 x u64 reserved. */
#pragma pack(push, 1)
typedef struct {
    char model_number[256], product_serial[256], fru_id[256], product_name[256];
    char manufacturer_name[256];
    uint64_t reserved[64];
} board_info_t;

/* amdsmi_kfd_info_t, packed: kfd_id u64, node_id u32, current_partition_id u32, 12 x u32. */
typedef struct {
    uint64_t kfd_id;
    uint32_t node_id, current_partition_id;
    uint32_t reserved[12];
} kfd_info_t;
#pragma pack(pop)

int amdsmi_get_gpu_board_info(void *handle, board_info_t *info) {
    gpu_t *g = gpu_of(handle);
    if (!g) return AMDSMI_STATUS_INVAL;
    memset(info, 0, sizeof *info);
    snprintf(info->product_serial, sizeof info->product_serial, "%s", g->serial);
    snprintf(info->product_name, sizeof info->product_name, "%s", g->product);
    snprintf(info->manufacturer_name, sizeof info->manufacturer_name, "AMD");
    return AMDSMI_STATUS_SUCCESS;
}

int amdsmi_get_gpu_kfd_info(void *handle, kfd_info_t *info) {
    gpu_t *g = gpu_of(handle);
    if (!g) return AMDSMI_STATUS_INVAL;
    memset(info, 0, sizeof *info);
    info->kfd_id = 1000 + (uint64_t)((uintptr_t)handle);
    info->node_id = (uint32_t)((uintptr_t)handle) + 1;
    info->current_partition_id = g->part;
    return AMDSMI_STATUS_SUCCESS;
}
