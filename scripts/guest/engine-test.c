/*
 * Guest test program for the dma-engine (docs/devices/dma-engine.md), run
 * as /init's child in a minimal Linux guest under QEMU's vfio-user-pci.
 *
 * It finds the device in sysfs, enables it, maps BAR 0 (registers) and
 * BAR 2 (doorbells) through resource0/resource2, takes guest-physical
 * addresses of locked pages from /proc/self/pagemap, and runs copies,
 * fills, compares and CRC-32C with RID DMA (IOVA = guest physical address
 * on the compat IOAS), checking every result. It prints one line starting
 * with "ENGINE-TEST PASS" or "ENGINE-TEST FAIL".
 *
 * `engine-test restart` then keeps copying while the host kills iommu-core
 * and starts a new one (scripts/qemu-e2e.sh). What the guest sees then:
 * while the device server has no core, its DMA through the compat IOAS
 * fails, so fetching a descriptor from the ring (in guest RAM) faults and
 * the queue halts (Q_STATUS bit 1); a descriptor caught as the core goes
 * may also end with an error status, or be consumed (HEAD moves) without a
 * completion record, since the record cannot be written either. The guest
 * counts each as a failed attempt, restarts the queue (Q_CTRL 0 then 1:
 * it restarts empty at the doorbell) and tries again every 5 ms. Once the
 * server has reconnected and rebuilt its compat IOAS, copies succeed again
 * with no action of the VMM. It prints "ENGINE-TEST RESTART READY" when it
 * starts, "ENGINE-TEST RESTART OUTAGE" at the first failure, "ENGINE-TEST
 * RESTART RECOVERED" with the time from the first failure to the first
 * good copy, then "ENGINE-TEST RESTART PASS" after 200 more good copies,
 * or "ENGINE-TEST FAIL".
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u

static volatile uint32_t *regs;
static volatile uint32_t *bells;

static int fail(const char *what)
{
    printf("ENGINE-TEST FAIL: %s\n", what);
    fflush(stdout);
    return 1;
}

static uint64_t phys_of(void *p)
{
    int fd = open("/proc/self/pagemap", O_RDONLY);
    uint64_t e = 0;
    if (fd < 0)
        return 0;
    if (pread(fd, &e, 8, ((uintptr_t)p / PAGE) * 8) != 8)
        e = 0;
    close(fd);
    if (!(e & (1ull << 63)))
        return 0;
    return (e & ((1ull << 55) - 1)) * PAGE + ((uintptr_t)p % PAGE);
}

static void *page(uint64_t *pa)
{
    void *p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    memset(p, 0, PAGE);
    *pa = phys_of(p);
    return *pa ? p : NULL;
}

static uint32_t crc32c(uint32_t crc, const uint8_t *b, size_t n)
{
    crc = ~crc;
    while (n--) {
        crc ^= *b++;
        for (int k = 0; k < 8; k++)
            crc = (crc & 1) ? (crc >> 1) ^ 0x82f63b78u : crc >> 1;
    }
    return ~crc;
}

/* Reads a sysfs id file of a PCI device into buf (NUL-terminated). */
static int read_id(const char *dev, const char *file, char *buf, size_t n)
{
    char path[512];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/%s", dev, file);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -1;
    memset(buf, 0, n);
    ssize_t r = read(fd, buf, n - 1);
    close(fd);
    return r > 0 ? 0 : -1;
}

static int find_device(char *out, size_t n)
{
    DIR *d = opendir("/sys/bus/pci/devices");
    struct dirent *e;
    char vendor[32], device[32];
    if (!d)
        return -1;
    while ((e = readdir(d))) {
        if (read_id(e->d_name, "vendor", vendor, sizeof vendor) || strncmp(vendor, "0x1b36", 6))
            continue;
        if (read_id(e->d_name, "device", device, sizeof device) || strncmp(device, "0xd3a0", 6))
            continue;
        snprintf(out, n, "/sys/bus/pci/devices/%s", e->d_name);
        closedir(d);
        return 0;
    }
    closedir(d);
    return -1;
}

static volatile void *map_bar(const char *dev, int bar)
{
    char path[512];
    snprintf(path, sizeof path, "%s/resource%d", dev, bar);
    int fd = open(path, O_RDWR | O_SYNC);
    if (fd < 0)
        return NULL;
    void *p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return p == MAP_FAILED ? NULL : p;
}

struct desc {
    uint8_t op, flags;
    uint16_t rsvd;
    uint32_t pasid, len, rsvd2;
    uint64_t src, dst, completion, pattern, pad[2];
};

static struct desc *ring;
static uint8_t *comp;
static uint64_t ring_pa, comp_pa;
static uint32_t tail;

/* Submits one descriptor on queue 0 and waits for its completion record. */
static int run(struct desc d, uint8_t *status, uint64_t *result)
{
    uint32_t slot = tail % 16;
    volatile uint8_t *c = comp + slot * 32;
    memset((void *)c, 0, 32);
    d.completion = comp_pa + slot * 32;
    ring[slot] = d;
    __sync_synchronize();
    tail++;
    bells[0] = tail; /* BAR 2, mmap-ed: no exit to the VMM */
    for (long i = 0; i < 200000000L; i++) {
        if (c[0]) {
            __sync_synchronize();
            *status = c[0];
            memcpy(result, (void *)(c + 16), 8);
            return 0;
        }
        if (i > 1000)
            usleep(10);
    }
    return -1;
}

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static volatile uint32_t *q; /* queue 0's register block */

/* Disabled and enabled again, a queue restarts empty at the doorbell. */
static void restart_queue(void)
{
    q[0x10 / 4] = 0;
    q[0x10 / 4] = 1;
}

/*
 * One copy of a page for the restart phase: 1 if it completed with
 * SUCCESS, 0 if it failed (why in *why). Waits at most timeout_ms.
 */
static int try_copy(uint64_t src, uint64_t dst, double timeout_ms, const char **why)
{
    uint32_t slot = tail % 16;
    volatile uint8_t *c = comp + slot * 32;
    memset((void *)c, 0, 32);
    struct desc d = {.op = 1, .len = PAGE, .src = src, .dst = dst, .completion = comp_pa + slot * 32};
    ring[slot] = d;
    __sync_synchronize();
    tail++;
    bells[0] = tail;
    double t0 = now_ms();
    for (long i = 0;; i++) {
        if (c[0]) {
            __sync_synchronize();
            if (c[0] == 1)
                return 1;
            *why = "a completion record with an error status";
            return 0;
        }
        if (i % 64 == 63) {
            if (q[0x1c / 4] & 2) {
                *why = "the queue halted (a descriptor fetch faulted)";
                return 0;
            }
            /* HEAD moves after the record was written (or could not be). */
            if (q[0x14 / 4] == tail) {
                __sync_synchronize();
                if (c[0] == 1)
                    return 1;
                *why = c[0] ? "a completion record with an error status" : "consumed without a completion record";
                return 0;
            }
            if (now_ms() - t0 > timeout_ms) {
                *why = "no completion in time";
                return 0;
            }
        }
        if (i > 1000)
            usleep(10);
    }
}

/* Copies until the core has gone and come back (see the top comment). */
static int restart_phase(uint8_t *a, uint8_t *b, uint64_t a_pa, uint64_t b_pa)
{
    printf("ENGINE-TEST RESTART READY: copying while the core goes and comes back\n");
    fflush(stdout);
    double start = now_ms(), first_fail = 0, recovered = 0;
    int failures = 0, ok_after = 0, ok_before = 0;
    const char *why = "", *first_why = "";
    for (int round = 0;; round++) {
        if (!failures && now_ms() - start > 120000)
            return fail("restart: copies never failed within 120 s (the core was not killed?)");
        for (unsigned i = 0; i < PAGE; i++)
            a[i] = (uint8_t)(i * 13 + round);
        memset(b, 0, PAGE);
        if (try_copy(a_pa, b_pa, 2000, &why)) {
            if (memcmp(a, b, PAGE))
                return fail("restart: a copy completed with SUCCESS but wrong data");
            if (!failures) {
                ok_before++;
                continue;
            }
            if (!recovered) {
                recovered = now_ms();
                printf("ENGINE-TEST RESTART RECOVERED: the device was without DMA for %.0f ms (%d failed attempts, "
                       "the first: %s)\n",
                       recovered - first_fail, failures, first_why);
                fflush(stdout);
            }
            if (++ok_after >= 200)
                break;
            continue;
        }
        if (recovered)
            return fail("restart: a copy failed after DMA had come back");
        if (!failures) {
            first_fail = now_ms();
            first_why = why;
            printf("ENGINE-TEST RESTART OUTAGE: %s\n", why);
            fflush(stdout);
        }
        failures++;
        restart_queue();
        if (now_ms() - first_fail > 90000)
            return fail("restart: DMA did not come back within 90 s");
        usleep(5000);
    }
    printf("ENGINE-TEST RESTART PASS: %d copies before the outage, %d failed attempts during it, %d good copies "
           "after it\n",
           ok_before, failures, ok_after);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    char dev[512], path[600];
    if (find_device(dev, sizeof dev))
        return fail("no 1b36:d3a0 device in /sys/bus/pci/devices");
    snprintf(path, sizeof path, "%s/enable", dev);
    int fd = open(path, O_WRONLY);
    if (fd < 0 || write(fd, "1", 1) != 1)
        return fail("cannot enable the device");
    close(fd);
    regs = map_bar(dev, 0);
    bells = map_bar(dev, 2);
    if (!regs || !bells)
        return fail("cannot map BAR 0 / BAR 2");
    if (regs[0] != 0xd3a00001u)
        return fail("unexpected ID register");
    /* Bus mastering: the command register, bit 2. */
    snprintf(path, sizeof path, "%s/config", dev);
    fd = open(path, O_RDWR);
    uint16_t cmd = 0;
    if (fd < 0 || pread(fd, &cmd, 2, 4) != 2)
        return fail("cannot read the command register");
    cmd |= 0x6;
    if (pwrite(fd, &cmd, 2, 4) != 2)
        return fail("cannot set bus mastering");
    close(fd);

    ring = page(&ring_pa);
    comp = page(&comp_pa);
    uint64_t a_pa, b_pa;
    uint8_t *a = page(&a_pa), *b = page(&b_pa);
    if (!ring || !comp || !a || !b)
        return fail("cannot get locked pages with physical addresses");

    regs[0x10 / 4] = 1; /* CTRL: enable */
    q = regs + 0x100 / 4;
    q[0x10 / 4] = 0;
    q[0x00 / 4] = (uint32_t)ring_pa;
    q[0x04 / 4] = (uint32_t)(ring_pa >> 32);
    q[0x08 / 4] = 16;
    q[0x0c / 4] = 0;
    q[0x10 / 4] = 1;
    tail = q[0x14 / 4];

    uint8_t st;
    uint64_t res;
    int n = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int round = 0; round < 200; round++) {
        for (unsigned i = 0; i < PAGE; i++)
            a[i] = (uint8_t)(i * 7 + round);
        struct desc d = {.op = 1, .len = PAGE, .src = a_pa, .dst = b_pa};
        if (run(d, &st, &res) || st != 1 || memcmp(a, b, PAGE))
            return fail("copy");
        n++;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;

    struct desc f = {.op = 2, .len = 1000, .dst = b_pa, .pattern = 0x0807060504030201ull};
    if (run(f, &st, &res) || st != 1)
        return fail("fill");
    for (int i = 0; i < 1000; i++)
        if (b[i] != (uint8_t)(i % 8 + 1))
            return fail("fill contents");
    struct desc crc = {.op = 4, .len = 1000, .src = b_pa};
    if (run(crc, &st, &res) || st != 1 || (uint32_t)res != crc32c(0, b, 1000))
        return fail("crc32c");
    memcpy(a, b, 1000);
    a[777] ^= 1;
    struct desc cmp = {.op = 3, .len = 1000, .src = a_pa, .dst = b_pa};
    if (run(cmp, &st, &res) || st != 4 || res != 777)
        return fail("compare");
    printf("ENGINE-TEST PASS: %d copies of 4 KiB (%.0f copies/s), fill, crc32c, compare checked\n", n, n / secs);
    fflush(stdout);
    if (argc > 1 && !strcmp(argv[1], "restart"))
        return restart_phase(a, b, a_pa, b_pa);
    return 0;
}
