/*
 * llem SPANK plugin: --energy-tag=TAG for srun, sbatch and salloc.
 *
 * Submitting side (srun, sbatch, salloc: local and allocator contexts)
 *   - the tag comes from --energy-tag (also on "#SBATCH" lines), else from the
 *     LLEM_ENERGY_TAG environment variable, else from the plugin argument
 *     default_tag=; it is validated (1 to 64 of [A-Za-z0-9._-]) before the job
 *     is queued, and an invalid tag refuses the submission with a clear error;
 *   - with required_tag=1 a new job without any tag is refused;
 *   - the tag is handed to Prolog and Epilog through the job control
 *     environment: they see SPANK_LLEM_ENERGY_TAG.
 *
 * Job side (slurmstepd, slurmd, Prolog/Epilog: remote, slurmd and job script
 * contexts): every callback returns 0 whatever happens. A SPANK error there
 * fails the step or drains the node, and accounting must never do that; the
 * problem is logged instead. In the job's tasks LLEM_ENERGY_TAG is set to the
 * tag given with --energy-tag, so that tools inside the job can read it.
 *
 * Plugin arguments (plugstack.conf), key=value, unknown keys are an error:
 *   required_tag=0|1   refuse new jobs without a tag (default 0)
 *   default_tag=TAG    tag for jobs that give none (default: none)
 *
 * Built against the spank.h of one Slurm release: rebuild it for every Slurm
 * major release (Slurm refuses plugins built for another version).
 */

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include <slurm/spank.h>

SPANK_PLUGIN(llem, 1);

#define TAG_MAX_LEN 64
#define TAG_ENV "LLEM_ENERGY_TAG"
#define TAG_ALLOWED "letters, digits, '.', '_' or '-'"

/* Per-process state: each srun, sbatch, salloc and slurmstepd loads its own. */
static int required_tag;
static char default_tag[TAG_MAX_LEN + 1];
static char option_tag[TAG_MAX_LEN + 1];
static int args_ok = 1;

static int energy_tag_cb(int val, const char *optarg, int remote);

static struct spank_option energy_tag_option = {
    "energy-tag",
    "TAG",
    "Tag this job's energy and emissions in llem (1-64 letters, digits, '.', '_', '-').",
    1,
    0,
    energy_tag_cb,
};

/* 1 when TAG is 1 to 64 of [A-Za-z0-9._-], else 0. */
static int tag_is_valid(const char *tag)
{
    size_t len;

    if (tag == NULL)
        return 0;
    len = strlen(tag);
    if (len < 1 || len > TAG_MAX_LEN)
        return 0;
    return strspn(tag, "abcdefghijklmnopqrstuvwxyz"
                       "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                       "0123456789._-") == len;
}

/* Full strtol validation: the whole string is one integer in [min, max]. */
static int parse_long(const char *s, long min, long max, long *out)
{
    char *end = NULL;
    long v;

    if (s == NULL || *s == '\0')
        return -1;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

/* Copy a tag into a TAG_MAX_LEN + 1 buffer, truncating (callers validate first). */
static void copy_tag(char *dst, const char *tag)
{
    size_t len = strnlen(tag, TAG_MAX_LEN);

    memcpy(dst, tag, len);
    dst[len] = '\0';
}

/* Parse plugstack.conf arguments; returns 0, or -1 after logging every bad one. */
static int parse_args(int ac, char **av)
{
    int rc = 0;
    int i;

    for (i = 0; i < ac; i++) {
        const char *arg = av[i];
        const char *eq = strchr(arg, '=');
        const char *value = eq ? eq + 1 : NULL;
        size_t keylen = eq ? (size_t)(eq - arg) : strlen(arg);
        long v;

        if (eq == NULL) {
            slurm_error("llem: plugin argument '%s' is not key=value", arg);
            rc = -1;
        } else if (keylen == strlen("required_tag") &&
                   strncmp(arg, "required_tag", keylen) == 0) {
            if (parse_long(value, 0, 1, &v) != 0) {
                slurm_error("llem: required_tag='%s': expected 0 or 1", value);
                rc = -1;
            } else {
                required_tag = (int)v;
            }
        } else if (keylen == strlen("default_tag") &&
                   strncmp(arg, "default_tag", keylen) == 0) {
            if (!tag_is_valid(value)) {
                slurm_error("llem: default_tag='%s': use 1 to %d %s", value,
                            TAG_MAX_LEN, TAG_ALLOWED);
                rc = -1;
            } else {
                copy_tag(default_tag, value);
            }
        } else {
            slurm_error("llem: unknown plugin argument '%s' (known: required_tag=0|1, "
                        "default_tag=TAG)", arg);
            rc = -1;
        }
    }
    return rc;
}

static int is_submitting_side(spank_context_t ctx)
{
    return ctx == S_CTX_LOCAL || ctx == S_CTX_ALLOCATOR;
}

static int energy_tag_cb(int val, const char *optarg, int remote)
{
    int rc = 0;

    (void)val;
    if (tag_is_valid(optarg)) {
        copy_tag(option_tag, optarg);
    } else if (remote) {
        /* Already checked on the submitting side; never fail a step here. */
        slurm_error("llem: ignoring invalid --energy-tag received by the job");
    } else {
        slurm_error("llem: invalid --energy-tag '%s': use 1 to %d %s",
                    optarg ? optarg : "", TAG_MAX_LEN, TAG_ALLOWED);
        rc = -1; /* srun/sbatch/salloc stop here, before anything is queued */
    }
    return rc;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
    spank_context_t ctx = spank_context();
    int rc = 0;
    spank_err_t err;

    if (parse_args(ac, av) != 0)
        args_ok = 0;

    if (ctx == S_CTX_LOCAL || ctx == S_CTX_ALLOCATOR || ctx == S_CTX_REMOTE) {
        err = spank_option_register(sp, &energy_tag_option);
        if (err != ESPANK_SUCCESS)
            slurm_error("llem: cannot register --energy-tag: %s", spank_strerror(err));
    }

    /* A bad plugstack.conf line stops submissions (the admin sees it at once),
     * never a job that is already running. */
    if (!args_ok && is_submitting_side(ctx)) {
        slurm_error("llem: fix the llem line in plugstack.conf");
        rc = -1;
    }
    return rc;
}

/* Submitting side: pick, check and publish the job's tag. */
static int publish_tag(spank_t sp)
{
    const char *tag = NULL;
    const char *env;
    spank_err_t err;
    int rc = 0;

    /* srun inside an existing allocation starts a step, not a job: the job's tag
     * was settled when the job was submitted. */
    if (spank_context() == S_CTX_LOCAL && getenv("SLURM_JOB_ID") != NULL)
        goto out;

    if (option_tag[0] != '\0') {
        tag = option_tag;
    } else if ((env = getenv(TAG_ENV)) != NULL && env[0] != '\0') {
        if (!tag_is_valid(env)) {
            slurm_error("llem: invalid %s='%s': use 1 to %d %s", TAG_ENV, env,
                        TAG_MAX_LEN, TAG_ALLOWED);
            rc = -1;
            goto out;
        }
        tag = env;
    } else if (default_tag[0] != '\0') {
        tag = default_tag;
    }

    if (tag == NULL) {
        if (required_tag) {
            slurm_error("llem: this cluster requires an energy tag: add "
                        "--energy-tag=TAG or set %s", TAG_ENV);
            rc = -1;
        }
        goto out;
    }

    err = spank_job_control_setenv(sp, TAG_ENV, tag, 1);
    if (err != ESPANK_SUCCESS) {
        slurm_error("llem: cannot pass the energy tag to the job: %s",
                    spank_strerror(err));
        rc = -1;
    }
out:
    return rc;
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
    spank_context_t ctx = spank_context();
    spank_err_t err;
    int rc = 0;

    (void)ac;
    (void)av;
    if (is_submitting_side(ctx)) {
        rc = publish_tag(sp);
    } else if (ctx == S_CTX_REMOTE && option_tag[0] != '\0') {
        /* Let tools inside the job (llem wrap) see the tag; never fail the step. */
        err = spank_setenv(sp, TAG_ENV, option_tag, 1);
        if (err != ESPANK_SUCCESS)
            slurm_error("llem: cannot set %s in the job: %s", TAG_ENV,
                        spank_strerror(err));
    }
    return rc;
}
