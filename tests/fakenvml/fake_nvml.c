/*
 * A fake libnvidia-ml.so.1 for tests: the NVML entry points that llem's NVML sensor reaches
 * through pynvml, with NVML's signatures, return codes and units.
 *
 * The GPUs are described by a text file named by $FAKE_NVML_STATE, re-read on every call so
 * that a test can advance counters, reset them or lose a GPU between two reads:
 *
 *   driver=550.54.15
 *   init_error=0                       # nvmlInit returns this code (0: success)
 *   gpu uuid=GPU-... minor=3 energy_mj=123 power_mw=250000 power_limit_mw=400000 \
 *       energy=1 lost=0 error=0 busid=00000000:07:00.0 name=NVIDIA A100-SXM4-80GB
 *
 * One "gpu" line per GPU, in NVML index order; name= comes last and takes the rest of the
 * line. energy=0 makes nvmlDeviceGetTotalEnergyConsumption NOT_SUPPORTED (pre-Volta),
 * lost=1 makes every call on that GPU return GPU_IS_LOST, error=N makes its energy and power
 * reads return code N.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_UNKNOWN = 999,
};

#define MAX_GPUS 16
#define TEXT_LEN 96
#define PCI_BUS_ID_LEN 32
#define PCI_BUS_ID_LEGACY_LEN 16

/* The layout of NVML's nvmlPciInfo_t (v3). */
typedef struct nvmlPciInfo_st {
    char busIdLegacy[PCI_BUS_ID_LEGACY_LEN];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[PCI_BUS_ID_LEN];
} nvmlPciInfo_t;

struct fake_gpu {
    char uuid[TEXT_LEN];
    char name[TEXT_LEN];
    char busid[PCI_BUS_ID_LEN];
    unsigned int minor;
    unsigned long long energy_mj;
    unsigned int power_mw;
    unsigned int power_limit_mw;
    int energy_supported;
    int lost;
    int error;
};

struct fake_state {
    char driver[TEXT_LEN];
    int init_error;
    unsigned int count;
    struct fake_gpu gpus[MAX_GPUS];
};

/* nvmlDevice_t is an opaque pointer; ours point into this array. */
struct nvmlDevice_st {
    int unused;
};
typedef struct nvmlDevice_st *nvmlDevice_t;

static struct nvmlDevice_st handles[MAX_GPUS];
static struct fake_state state;
static int init_count;

/* Copy a NUL-terminated string, cut to fit (the state file may hold longer text). */
static void copy_text(char *dst, size_t size, const char *src)
{
    size_t n = strlen(src);

    if (n >= size)
        n = size - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

static void parse_gpu_field(struct fake_gpu *gpu, const char *key, const char *value)
{
    if (strcmp(key, "uuid") == 0)
        copy_text(gpu->uuid, sizeof(gpu->uuid), value);
    else if (strcmp(key, "busid") == 0)
        copy_text(gpu->busid, sizeof(gpu->busid), value);
    else if (strcmp(key, "minor") == 0)
        gpu->minor = (unsigned int)strtoul(value, NULL, 10);
    else if (strcmp(key, "energy_mj") == 0)
        gpu->energy_mj = strtoull(value, NULL, 10);
    else if (strcmp(key, "power_mw") == 0)
        gpu->power_mw = (unsigned int)strtoul(value, NULL, 10);
    else if (strcmp(key, "power_limit_mw") == 0)
        gpu->power_limit_mw = (unsigned int)strtoul(value, NULL, 10);
    else if (strcmp(key, "energy") == 0)
        gpu->energy_supported = atoi(value);
    else if (strcmp(key, "lost") == 0)
        gpu->lost = atoi(value);
    else if (strcmp(key, "error") == 0)
        gpu->error = atoi(value);
    else
        fprintf(stderr, "fake_nvml: unknown gpu field %s\n", key);
}

/* "gpu k=v k=v ... name=rest of line" */
static void parse_gpu_line(char *line)
{
    struct fake_gpu *gpu;
    char *field = line;

    if (state.count >= MAX_GPUS) {
        fprintf(stderr, "fake_nvml: more than %d GPUs\n", MAX_GPUS);
        return;
    }
    gpu = &state.gpus[state.count++];
    memset(gpu, 0, sizeof(*gpu));
    gpu->energy_supported = 1;
    while (field && *field) {
        char *eq, *end;

        while (*field == ' ')
            field++;
        eq = strchr(field, '=');
        if (!eq)
            break;
        *eq = '\0';
        if (strcmp(field, "name") == 0) {
            copy_text(gpu->name, sizeof(gpu->name), eq + 1);
            break;
        }
        end = strchr(eq + 1, ' ');
        if (end)
            *end = '\0';
        parse_gpu_field(gpu, field, eq + 1);
        field = end ? end + 1 : NULL;
    }
}

static void parse_line(char *line)
{
    line[strcspn(line, "\r\n")] = '\0';
    if (strncmp(line, "gpu ", 4) == 0)
        parse_gpu_line(line + 4);
    else if (strncmp(line, "driver=", 7) == 0)
        copy_text(state.driver, sizeof(state.driver), line + 7);
    else if (strncmp(line, "init_error=", 11) == 0)
        state.init_error = atoi(line + 11);
}

/* Re-read the state file; NVML_ERROR_UNKNOWN (and a word on stderr) when it cannot be. */
static nvmlReturn_t load_state(void)
{
    const char *path = getenv("FAKE_NVML_STATE");
    char line[512];
    FILE *f;

    if (!path) {
        fprintf(stderr, "fake_nvml: FAKE_NVML_STATE is not set\n");
        return NVML_ERROR_UNKNOWN;
    }
    f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "fake_nvml: cannot open %s: %s\n", path, strerror(errno));
        return NVML_ERROR_UNKNOWN;
    }
    memset(&state, 0, sizeof(state));
    while (fgets(line, sizeof(line), f))
        parse_line(line);
    fclose(f);
    return NVML_SUCCESS;
}

/* Load the state and find the GPU behind a handle, as every device call does. */
static nvmlReturn_t device_gpu(nvmlDevice_t device, struct fake_gpu **gpu)
{
    nvmlReturn_t ret;
    long index;

    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    ret = load_state();
    if (ret != NVML_SUCCESS)
        return ret;
    if (!device)
        return NVML_ERROR_INVALID_ARGUMENT;
    index = device - handles;
    if (index < 0 || index >= (long)state.count)
        return NVML_ERROR_INVALID_ARGUMENT;
    *gpu = &state.gpus[index];
    if ((*gpu)->lost)
        return NVML_ERROR_GPU_IS_LOST;
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_out(char *dst, unsigned int length, const char *src)
{
    if (!dst)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    nvmlReturn_t ret = load_state();

    (void)flags;
    if (ret != NVML_SUCCESS)
        return ret;
    if (state.init_error != NVML_SUCCESS)
        return state.init_error;
    init_count++;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void)
{
    return nvmlInitWithFlags(0);
}

nvmlReturn_t nvmlShutdown(void)
{
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    init_count--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case NVML_SUCCESS:
        return "Success";
    case NVML_ERROR_UNINITIALIZED:
        return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT:
        return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED:
        return "Not Supported";
    case NVML_ERROR_NO_PERMISSION:
        return "Insufficient Permissions";
    case NVML_ERROR_INSUFFICIENT_SIZE:
        return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED:
        return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST:
        return "GPU is lost";
    default:
        return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    nvmlReturn_t ret;

    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    ret = load_state();
    if (ret != NVML_SUCCESS)
        return ret;
    return copy_out(version, length, state.driver);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    nvmlReturn_t ret;

    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (!deviceCount)
        return NVML_ERROR_INVALID_ARGUMENT;
    ret = load_state();
    if (ret != NVML_SUCCESS)
        return ret;
    *deviceCount = state.count;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    nvmlReturn_t ret;

    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (!device)
        return NVML_ERROR_INVALID_ARGUMENT;
    ret = load_state();
    if (ret != NVML_SUCCESS)
        return ret;
    if (index >= state.count)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (state.gpus[index].lost)
        return NVML_ERROR_GPU_IS_LOST;
    *device = &handles[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_gpu(device, &gpu);

    if (ret != NVML_SUCCESS)
        return ret;
    return copy_out(uuid, length, gpu->uuid);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_gpu(device, &gpu);

    if (ret != NVML_SUCCESS)
        return ret;
    return copy_out(name, length, gpu->name);
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minorNumber)
{
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_gpu(device, &gpu);

    if (ret != NVML_SUCCESS)
        return ret;
    if (!minorNumber)
        return NVML_ERROR_INVALID_ARGUMENT;
    *minorNumber = gpu->minor;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_gpu(device, &gpu);

    if (ret != NVML_SUCCESS)
        return ret;
    if (!pci)
        return NVML_ERROR_INVALID_ARGUMENT;
    memset(pci, 0, sizeof(*pci));
    copy_text(pci->busIdLegacy, sizeof(pci->busIdLegacy), gpu->busid);
    copy_text(pci->busId, sizeof(pci->busId), gpu->busid);
    return NVML_SUCCESS;
}

/* Millijoules since the driver was loaded; NOT_SUPPORTED before Volta. */
nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *energy)
{
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_gpu(device, &gpu);

    if (ret != NVML_SUCCESS)
        return ret;
    if (!energy)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!gpu->energy_supported)
        return NVML_ERROR_NOT_SUPPORTED;
    if (gpu->error)
        return gpu->error;
    *energy = gpu->energy_mj;
    return NVML_SUCCESS;
}

/* Milliwatts, for the whole board. */
nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power)
{
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_gpu(device, &gpu);

    if (ret != NVML_SUCCESS)
        return ret;
    if (!power)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (gpu->error)
        return gpu->error;
    *power = gpu->power_mw;
    return NVML_SUCCESS;
}

/* Milliwatts. */
nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit)
{
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_gpu(device, &gpu);

    if (ret != NVML_SUCCESS)
        return ret;
    if (!limit)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!gpu->power_limit_mw)
        return NVML_ERROR_NOT_SUPPORTED;
    *limit = gpu->power_limit_mw;
    return NVML_SUCCESS;
}
