/* A DCMI power-reading module for OpenIPMI's real BMC simulator, ipmi_sim (tests only).
 *
 * ipmi_sim serves IPMI over LAN (RMCP and RMCP+) and dispatches the Group Extension netfn
 * (0x2C) by its first data byte to handlers that modules register; it has none for DCMI
 * (group 0xDC). This module, loaded with `loadlib "dcmi_power.so" "READING_FILE"` in lan.conf,
 * answers DCMI "Get Power Reading" (cmd 0x02) as the DCMI 1.5 specification lays it out, from
 * READING_FILE, re-read on every request so that tests change the power by rewriting it:
 *
 *   watts=220 min=84 max=420 avg=221 period_ms=5000 active=1 delay_ms=0 cc=0
 *
 * `active=0` reports the power measurement as not active; `delay_ms` holds the simulator
 * before it answers (a slow or hung BMC: ipmi_sim is single-threaded); `cc` is a completion
 * code answered instead of a reading. "Get DCMI Capabilities" (cmd 0x01) answers DCMI 1.5
 * with power management supported, as clients may ask first.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <OpenIPMI/ipmi_err.h>
#include <OpenIPMI/lanserv.h>
#include <OpenIPMI/mcserv.h>
#include <OpenIPMI/msg.h>
#include <OpenIPMI/serv.h>

#define DCMI_GROUP 0xDC
#define DCMI_GET_CAPABILITIES 0x01
#define DCMI_GET_POWER_READING 0x02

static char reading_file[1024];

typedef struct {
    unsigned watts, min, max, avg, period_ms, active, delay_ms, cc;
} reading_t;

static void read_state(reading_t *r) {
    memset(r, 0, sizeof *r);
    r->active = 1;
    r->period_ms = 1000;
    FILE *f = fopen(reading_file, "r");
    if (!f) {
        r->cc = IPMI_NOT_SUPPORTED_IN_PRESENT_STATE_CC;
        return;
    }
    char word[64];
    while (fscanf(f, "%63s", word) == 1) {
        unsigned v;
        char key[32];
        if (sscanf(word, "%31[a-z_]=%u", key, &v) != 2) continue;
        if (!strcmp(key, "watts")) r->watts = v;
        else if (!strcmp(key, "min")) r->min = v;
        else if (!strcmp(key, "max")) r->max = v;
        else if (!strcmp(key, "avg")) r->avg = v;
        else if (!strcmp(key, "period_ms")) r->period_ms = v;
        else if (!strcmp(key, "active")) r->active = v;
        else if (!strcmp(key, "delay_ms")) r->delay_ms = v;
        else if (!strcmp(key, "cc")) r->cc = v;
    }
    fclose(f);
}

static void put16(unsigned char *p, unsigned v) {
    p[0] = v & 0xff;
    p[1] = (v >> 8) & 0xff;
}

static void put32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (v >> (8 * i)) & 0xff;
}

static void dcmi_handler(lmc_data_t *mc, msg_t *msg, unsigned char *rdata,
                         unsigned int *rdata_len, void *cb_data) {
    (void)mc;
    (void)cb_data;
    if (msg->cmd == DCMI_GET_CAPABILITIES) {
        /* cc, group, DCMI 1.5 (major 1, minor 5), parameter revision 2, then parameter 1
         * (supported capabilities): mandatory platform capabilities with power management. */
        memset(rdata, 0, 9);
        rdata[1] = DCMI_GROUP;
        rdata[2] = 1;
        rdata[3] = 5;
        rdata[4] = 2;
        rdata[6] = 0x0F; /* mandatory platform capabilities */
        rdata[7] = 0x01; /* optional platform capabilities: power management */
        rdata[8] = 0x00;
        *rdata_len = 9;
        return;
    }
    if (msg->cmd != DCMI_GET_POWER_READING) {
        rdata[0] = IPMI_INVALID_CMD_CC;
        *rdata_len = 1;
        return;
    }
    reading_t r;
    read_state(&r);
    if (r.delay_ms) {
        struct timespec ts = {r.delay_ms / 1000, (long)(r.delay_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    if (r.cc) {
        rdata[0] = (unsigned char)r.cc;
        *rdata_len = 1;
        return;
    }
    /* cc, group, current, min, max, average (u16 LE), timestamp (u32), period (u32 ms),
     * state: 19 bytes (DCMI 1.5, table 6-16) */
    memset(rdata, 0, 19);
    rdata[0] = 0;
    rdata[1] = DCMI_GROUP;
    put16(rdata + 2, r.watts);
    put16(rdata + 4, r.min);
    put16(rdata + 6, r.max);
    put16(rdata + 8, r.avg);
    put32(rdata + 10, (uint32_t)time(NULL));
    put32(rdata + 14, r.period_ms);
    rdata[18] = r.active ? 0x40 : 0x00; /* bit 6: power measurement active */
    *rdata_len = 19;
}

int ipmi_sim_module_print_version(sys_data_t *sys, char *options) {
    (void)options;
    sys->log(sys, INFO, NULL, "llem test DCMI power module 1");
    return 0;
}

int ipmi_sim_module_init(sys_data_t *sys, const char *options) {
    (void)sys;
    snprintf(reading_file, sizeof reading_file, "%s", options ? options : "");
    ipmi_emu_register_group_extension_handler(DCMI_GROUP, dcmi_handler, NULL);
    return 0;
}
