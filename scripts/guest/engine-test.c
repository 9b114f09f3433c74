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
 *
 * `engine-test hotplug` waits for the device to be hot-added, checks it as
 * above through sysfs, then through the guest kernel's vfio-pci as a
 * user-space driver (the IOMMU group an emulated VT-d gives it, a type-1
 * container mapping a buffer at IOVA_BASE, BARs and config through the
 * device fd): bus mastering off holds DMA, on lets it run; then 4 queues,
 * each copy with the INTERRUPT flag and Q_CTRL bit 1, interrupts as
 * eventfds, first MSI (or MSI-X where the device has it; queue q must
 * interrupt on vector q only), then INTx (INTX_STATUS bit q and config
 * Status bit 3 while pending, both clear after the write-1-to-clear, an
 * unmask after each). It prints the device's /proc/interrupts lines
 * before ("ENGINE-TEST IRQ-BEFORE: ...") and after ("ENGINE-TEST IRQ:
 * ...") and checks the differences. Then it waits for the device to be
 * removed, and again. Lines: "ENGINE-TEST HOTPLUG WAITING n", "... ADDED
 * n", "... USED n", "... REMOVED n" (see hotplug() below).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <limits.h>
#include <linux/vfio.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
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

/* Finds the dma-engine; out gets its sysfs directory, bdf (if not NULL) its address. */
static int find_device_bdf(char *out, size_t n, char *bdf, size_t bn)
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
        if (bdf)
            snprintf(bdf, bn, "%s", e->d_name);
        closedir(d);
        return 0;
    }
    closedir(d);
    return -1;
}

static int find_device(char *out, size_t n)
{
    return find_device_bdf(out, n, NULL, 0);
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

/*
 * Puts d in queue 0's next slot with its completion record cleared and
 * rings the doorbell; returns the record.
 */
static volatile uint8_t *submit(struct desc d)
{
    uint32_t slot = tail % 16;
    volatile uint8_t *c = comp + slot * 32;
    memset((void *)c, 0, 32);
    d.completion = comp_pa + slot * 32;
    ring[slot] = d;
    __sync_synchronize();
    tail++;
    bells[0] = tail; /* BAR 2, mmap-ed: no exit to the VMM */
    return c;
}

/* Submits one descriptor on queue 0 and waits for its completion record. */
static int run(struct desc d, uint8_t *status, uint64_t *result)
{
    volatile uint8_t *c = submit(d);
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

/*
 * Enables the device (CTRL) and queue 0 with a 16-entry ring at ring_pa
 * through the RID; the driver's tail starts at the doorbell.
 */
static void setup_queue0(void)
{
    regs[0x10 / 4] = 1;
    q = regs + 0x100 / 4;
    q[0x10 / 4] = 0;
    q[0x00 / 4] = (uint32_t)ring_pa;
    q[0x04 / 4] = (uint32_t)(ring_pa >> 32);
    q[0x08 / 4] = 16;
    q[0x0c / 4] = 0;
    q[0x10 / 4] = 1;
    tail = q[0x14 / 4];
}

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

static uint8_t *a, *b;
static uint64_t a_pa, b_pa;

/* Locked pages for the sysfs checks, once per run (the ring, records, two buffers). */
static int alloc_pages(void)
{
    if (ring)
        return 0;
    ring = page(&ring_pa);
    comp = page(&comp_pa);
    a = page(&a_pa);
    b = page(&b_pa);
    return ring && comp && a && b ? 0 : -1;
}

/*
 * The checks through sysfs (no driver bound): enable the device, map
 * BAR 0 and BAR 2 through resource0/resource2, set bus mastering in the
 * config file, then copies, a fill, a CRC-32C and a compare on queue 0.
 */
/*
 * Enables the device through sysfs (memory decode), maps BAR 0 and BAR 2,
 * checks the ID register, sets Memory Space and Bus Master Enable in the
 * command register (bits 1 and 2) and takes the locked pages.
 */
static int sysfs_setup(const char *dev)
{
    char path[600];
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
    snprintf(path, sizeof path, "%s/config", dev);
    fd = open(path, O_RDWR);
    uint16_t cmd = 0;
    if (fd < 0 || pread(fd, &cmd, 2, 4) != 2)
        return fail("cannot read the command register");
    cmd |= 0x6;
    if (pwrite(fd, &cmd, 2, 4) != 2)
        return fail("cannot set bus mastering");
    close(fd);
    if (alloc_pages())
        return fail("cannot get locked pages with physical addresses");
    return 0;
}

static int sysfs_checks(const char *dev)
{
    if (sysfs_setup(dev))
        return 1;

    setup_queue0();

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
    return 0;
}

/* Undoes sysfs_checks' mappings and enable, so that a driver can take the device. */
static void sysfs_release(const char *dev)
{
    char path[600];
    q[0x10 / 4] = 0;
    regs[0x10 / 4] = 0;
    munmap((void *)regs, PAGE);
    munmap((void *)bells, PAGE);
    regs = bells = q = NULL;
    snprintf(path, sizeof path, "%s/enable", dev);
    int fd = open(path, O_WRONLY);
    if (fd >= 0) {
        if (write(fd, "0", 1) != 1)
            perror("disable");
        close(fd);
    }
}

/*
 * The same device under the guest kernel's vfio-pci, as a user-space
 * driver would use it: the device's IOMMU group (an emulated VT-d; the
 * guest kernel runs with iommu=pt, so the sysfs checks above use guest
 * physical addresses), a type-1 container mapping one buffer at IOVA_BASE,
 * BARs mmap-ed through the device fd, the config region for bus mastering,
 * and interrupts as eventfds: MSI (or MSI-X where the device has it) with
 * one eventfd per vector, then INTx with an unmask after each interrupt.
 */
#define IOVA_BASE 0x1000000000ull /* 64 GiB: nothing of the guest's RAM there */
#define VF_PAGES 8                /* 0-3 rings, 4 records, 5 source, 6 destination */
#define IRQ_ROUNDS 8              /* interrupts per queue */

struct vf {
    int container, group, fd;
    uint64_t cfg_off;
    volatile uint32_t *regs, *bells;
    uint8_t *mem;
    uint32_t tail[4];
};

static int write_file(const char *path, const char *s)
{
    int fd = open(path, O_WRONLY);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, s, strlen(s));
    close(fd);
    return n == (ssize_t)strlen(s) ? 0 : -1;
}

static int region(int fd, uint32_t index, struct vfio_region_info *r)
{
    memset(r, 0, sizeof *r);
    r->argsz = sizeof *r;
    r->index = index;
    return ioctl(fd, VFIO_DEVICE_GET_REGION_INFO, r);
}

static uint16_t cfg_read16(struct vf *v, unsigned off)
{
    uint16_t x = 0xffff;
    if (pread(v->fd, &x, 2, v->cfg_off + off) != 2)
        return 0xffff;
    return x;
}

static int cfg_write16(struct vf *v, unsigned off, uint16_t x)
{
    return pwrite(v->fd, &x, 2, v->cfg_off + off) == 2 ? 0 : -1;
}

static int vf_fail(const char *what)
{
    printf("ENGINE-TEST FAIL: vfio: %s (errno %d: %s)\n", what, errno, strerror(errno));
    fflush(stdout);
    return 1;
}

static int vf_open(struct vf *v, const char *dev, const char *bdf)
{
    char path[700], link[PATH_MAX];
    memset(v, 0, sizeof *v);
    v->container = v->group = v->fd = -1;
    snprintf(path, sizeof path, "%s/driver_override", dev);
    if (write_file(path, "vfio-pci"))
        return vf_fail("cannot set driver_override");
    if (write_file("/sys/bus/pci/drivers_probe", bdf))
        return vf_fail("drivers_probe");
    snprintf(path, sizeof path, "%s/iommu_group", dev);
    ssize_t n = readlink(path, link, sizeof link - 1);
    if (n <= 0)
        return vf_fail("the device has no IOMMU group");
    link[n] = 0;
    const char *grp = strrchr(link, '/') + 1;
    snprintf(path, sizeof path, "/dev/vfio/%s", grp);
    for (int i = 0; i < 500 && (v->group = open(path, O_RDWR)) < 0; i++)
        usleep(10000); /* devtmpfs creates the node */
    if (v->group < 0)
        return vf_fail("cannot open the group");
    v->container = open("/dev/vfio/vfio", O_RDWR);
    if (v->container < 0 || ioctl(v->container, VFIO_GET_API_VERSION) != VFIO_API_VERSION ||
        !ioctl(v->container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU))
        return vf_fail("no type-1 v2 container");
    struct vfio_group_status gs = {.argsz = sizeof gs};
    if (ioctl(v->group, VFIO_GROUP_GET_STATUS, &gs) || !(gs.flags & VFIO_GROUP_FLAGS_VIABLE))
        return vf_fail("the group is not viable");
    if (ioctl(v->group, VFIO_GROUP_SET_CONTAINER, &v->container) ||
        ioctl(v->container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU))
        return vf_fail("cannot set up the container");
    v->fd = ioctl(v->group, VFIO_GROUP_GET_DEVICE_FD, bdf);
    if (v->fd < 0)
        return vf_fail("cannot get the device fd");
    struct vfio_region_info r0, r2, rc;
    if (region(v->fd, VFIO_PCI_BAR0_REGION_INDEX, &r0) || region(v->fd, VFIO_PCI_BAR2_REGION_INDEX, &r2) ||
        region(v->fd, VFIO_PCI_CONFIG_REGION_INDEX, &rc))
        return vf_fail("region info");
    if (!(r0.flags & VFIO_REGION_INFO_FLAG_MMAP) || !(r2.flags & VFIO_REGION_INFO_FLAG_MMAP))
        return vf_fail("BAR 0 or BAR 2 is not mmap-able");
    v->cfg_off = rc.offset;
    void *p0 = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, r0.offset);
    void *p2 = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, r2.offset);
    if (p0 == MAP_FAILED || p2 == MAP_FAILED)
        return vf_fail("cannot mmap BAR 0 / BAR 2");
    v->regs = p0;
    v->bells = p2;
    v->mem = mmap(NULL, VF_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (v->mem == MAP_FAILED)
        return vf_fail("mmap");
    memset(v->mem, 0, VF_PAGES * PAGE);
    struct vfio_iommu_type1_dma_map m = {.argsz = sizeof m,
                                         .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                                         .vaddr = (uintptr_t)v->mem,
                                         .iova = IOVA_BASE,
                                         .size = VF_PAGES * PAGE};
    if (ioctl(v->container, VFIO_IOMMU_MAP_DMA, &m))
        return vf_fail("VFIO_IOMMU_MAP_DMA");
    /* vfio-pci enabled memory decoding; bus mastering is bme_test's. */
    if (v->regs[0] != 0xd3a00001u)
        return vf_fail("unexpected ID register through the vfio BAR mapping");
    return 0;
}

static void vf_close(struct vf *v)
{
    if (v->regs) {
        for (int i = 0; i < 4; i++)
            v->regs[(0x100 + i * 0x40 + 0x10) / 4] = 0;
        v->regs[0x10 / 4] = 0;
        munmap((void *)v->regs, PAGE);
    }
    if (v->bells)
        munmap((void *)v->bells, PAGE);
    if (v->mem && v->mem != MAP_FAILED) {
        struct vfio_iommu_type1_dma_unmap u = {.argsz = sizeof u, .iova = IOVA_BASE, .size = VF_PAGES * PAGE};
        ioctl(v->container, VFIO_IOMMU_UNMAP_DMA, &u);
        munmap(v->mem, VF_PAGES * PAGE);
    }
    if (v->fd >= 0)
        close(v->fd);
    if (v->group >= 0)
        close(v->group);
    if (v->container >= 0)
        close(v->container);
    memset(v, 0, sizeof *v);
}

static int irq_count(struct vf *v, uint32_t index)
{
    struct vfio_irq_info i = {.argsz = sizeof i, .index = index};
    if (ioctl(v->fd, VFIO_DEVICE_GET_IRQ_INFO, &i))
        return -1;
    return (int)i.count;
}

/* SET_IRQS with eventfds (n of them; n = 0 tears the index down). */
static int set_irqs(struct vf *v, uint32_t index, int n, const int *fds)
{
    char buf[sizeof(struct vfio_irq_set) + 16 * sizeof(int)];
    struct vfio_irq_set *s = (void *)buf;
    s->argsz = sizeof *s + n * sizeof(int);
    s->flags = (n ? VFIO_IRQ_SET_DATA_EVENTFD : VFIO_IRQ_SET_DATA_NONE) | VFIO_IRQ_SET_ACTION_TRIGGER;
    s->index = index;
    s->start = 0;
    s->count = n;
    memcpy(s->data, fds, n * sizeof(int));
    return ioctl(v->fd, VFIO_DEVICE_SET_IRQS, s);
}

static int unmask_intx(struct vf *v)
{
    struct vfio_irq_set s = {.argsz = sizeof s,
                             .flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
                             .index = VFIO_PCI_INTX_IRQ_INDEX,
                             .start = 0,
                             .count = 1};
    return ioctl(v->fd, VFIO_DEVICE_SET_IRQS, &s);
}

static void vf_queues(struct vf *v)
{
    v->regs[0x10 / 4] = 1;
    for (int i = 0; i < 4; i++) {
        volatile uint32_t *qb = v->regs + (0x100 + i * 0x40) / 4;
        uint64_t rb = IOVA_BASE + (uint64_t)i * PAGE;
        qb[0x10 / 4] = 0;
        qb[0x00 / 4] = (uint32_t)rb;
        qb[0x04 / 4] = (uint32_t)(rb >> 32);
        qb[0x08 / 4] = 16;
        qb[0x0c / 4] = 0;
        qb[0x10 / 4] = 3; /* enabled, interrupts on */
        v->tail[i] = qb[0x14 / 4];
    }
}

/* One copy with the INTERRUPT flag on queue qn; its record is checked after the interrupt. */
static volatile uint8_t *vf_submit(struct vf *v, int qn, int round, uint8_t flags)
{
    uint8_t *src = v->mem + 5 * PAGE, *dst = v->mem + 6 * PAGE;
    for (unsigned i = 0; i < PAGE; i++)
        src[i] = (uint8_t)(i * 3 + qn * 17 + round);
    memset(dst, 0, PAGE);
    struct desc *r = (struct desc *)(v->mem + qn * PAGE);
    uint32_t slot = v->tail[qn] % 16;
    volatile uint8_t *c = v->mem + 4 * PAGE + qn * 512 + slot * 32;
    memset((void *)c, 0, 32);
    struct desc d = {.op = 1,
                     .flags = flags,
                     .len = PAGE,
                     .src = IOVA_BASE + 5 * PAGE,
                     .dst = IOVA_BASE + 6 * PAGE,
                     .completion = IOVA_BASE + 4 * PAGE + qn * 512 + slot * 32};
    r[slot] = d;
    __sync_synchronize();
    v->tail[qn]++;
    v->bells[qn * 2] = v->tail[qn];
    return c;
}

static int vf_check_copy(struct vf *v, volatile uint8_t *c)
{
    for (int i = 0; i < 100000 && !c[0]; i++)
        usleep(10); /* the record is written before the interrupt; this is only a ceiling */
    __sync_synchronize();
    return c[0] == 1 && !memcmp(v->mem + 5 * PAGE, v->mem + 6 * PAGE, PAGE) ? 0 : -1;
}

/*
 * Prints the /proc/interrupts lines naming this device and kind, after
 * "ENGINE-TEST <label>: ", and returns their counts (summed over CPUs).
 * An interrupt line's count lives as long as the line: INTx's goes on
 * across devices, so the tests print and subtract a count taken first.
 */
static int proc_interrupts(const char *label, const char *kind, const char *bdf, long *counts, int max)
{
    FILE *f = fopen("/proc/interrupts", "r");
    char line[1024];
    int n = 0;
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f)) {
        if (!strstr(line, kind) || !strstr(line, bdf))
            continue;
        line[strcspn(line, "\n")] = 0;
        printf("ENGINE-TEST %s: %s\n", label, line);
        char *p = strchr(line, ':');
        long sum = 0;
        if (p) {
            p++;
            for (;;) {
                char *e;
                long x = strtol(p, &e, 10);
                if (e == p)
                    break;
                sum += x;
                p = e;
            }
        }
        if (n < max)
            counts[n] = sum;
        n++;
    }
    fclose(f);
    fflush(stdout);
    return n;
}

static int msi_test(struct vf *v, const char *bdf)
{
    int msix = irq_count(v, VFIO_PCI_MSIX_IRQ_INDEX) > 0;
    uint32_t index = msix ? VFIO_PCI_MSIX_IRQ_INDEX : VFIO_PCI_MSI_IRQ_INDEX;
    const char *kind = msix ? "MSI-X" : "MSI";
    int nvec = irq_count(v, index), efd[16];
    if (nvec != 4) {
        printf("ENGINE-TEST FAIL: %s: the device offers %d vectors, not 4\n", kind, nvec);
        return 1;
    }
    for (int i = 0; i < nvec; i++)
        efd[i] = eventfd(0, EFD_NONBLOCK);
    int r = set_irqs(v, index, nvec, efd);
    if (r > 0) {
        /* vfio-pci returns how many vectors the kernel could give. */
        printf("ENGINE-TEST %s: the guest kernel gives %d of %d vectors\n", kind, r, nvec);
        nvec = r;
        r = set_irqs(v, index, nvec, efd);
    }
    if (r)
        return vf_fail("SET_IRQS");
    long before[16];
    const char *name = msix ? "vfio-msix" : "vfio-msi[";
    if (proc_interrupts("IRQ-BEFORE", name, bdf, before, 16) != nvec) {
        printf("ENGINE-TEST FAIL: %s: not %d lines in /proc/interrupts\n", kind, nvec);
        return 1;
    }
    vf_queues(v);
    for (int qn = 0; qn < 4; qn++) {
        int want = qn % nvec;
        for (int round = 0; round < IRQ_ROUNDS; round++) {
            volatile uint8_t *c = vf_submit(v, qn, round, 1);
            struct pollfd p[16];
            for (int i = 0; i < nvec; i++)
                p[i] = (struct pollfd){.fd = efd[i], .events = POLLIN};
            if (poll(p, nvec, 10000) <= 0) {
                printf("ENGINE-TEST FAIL: %s: no interrupt within 10 s for queue %d (record status %d)\n", kind, qn,
                       c[0]);
                return 1;
            }
            usleep(1000); /* a stray interrupt on another vector would show now */
            for (int i = 0; i < nvec; i++) {
                uint64_t x = 0;
                int got = read(efd[i], &x, 8) == 8;
                if (got != (i == want) || (got && x != 1)) {
                    printf("ENGINE-TEST FAIL: %s: queue %d's interrupt: vector %d %s (count %llu), expected vector %d "
                           "once\n",
                           kind, qn, i, got ? "fired" : "silent", (unsigned long long)x, want);
                    return 1;
                }
            }
            if (vf_check_copy(v, c)) {
                printf("ENGINE-TEST FAIL: %s: queue %d's copy (record status %d)\n", kind, qn, c[0]);
                return 1;
            }
        }
    }
    long counts[16];
    int lines = proc_interrupts("IRQ", name, bdf, counts, 16);
    if (lines != nvec) {
        printf("ENGINE-TEST FAIL: %s: %d lines in /proc/interrupts, expected %d\n", kind, lines, nvec);
        return 1;
    }
    for (int i = 0; i < nvec; i++) {
        long want = 0;
        for (int qn = 0; qn < 4; qn++)
            want += qn % nvec == i ? IRQ_ROUNDS : 0;
        if (counts[i] - before[i] != want) {
            printf("ENGINE-TEST FAIL: %s: vector %d counted %ld interrupts in /proc/interrupts, expected %ld\n", kind,
                   i, counts[i] - before[i], want);
            return 1;
        }
    }
    set_irqs(v, index, 0, NULL);
    for (int i = 0; i < nvec; i++)
        close(efd[i]);
    printf("ENGINE-TEST %s PASS: %d vectors, queue q on vector q mod %d, %d interrupts per queue, each on its "
           "vector only, counted in /proc/interrupts\n",
           kind, nvec, nvec, IRQ_ROUNDS);
    fflush(stdout);
    return 0;
}

static int intx_test(struct vf *v, const char *bdf)
{
    if (irq_count(v, VFIO_PCI_INTX_IRQ_INDEX) != 1)
        return fail("INTx: the device has no INTx");
    int efd = eventfd(0, EFD_NONBLOCK);
    if (set_irqs(v, VFIO_PCI_INTX_IRQ_INDEX, 1, &efd))
        return vf_fail("SET_IRQS INTx");
    long before;
    if (proc_interrupts("IRQ-BEFORE", "vfio-intx", bdf, &before, 1) != 1)
        return fail("INTx: not one vfio-intx line in /proc/interrupts");
    vf_queues(v);
    for (int qn = 0; qn < 4; qn++) {
        for (int round = 0; round < IRQ_ROUNDS; round++) {
            volatile uint8_t *c = vf_submit(v, qn, round, 1);
            struct pollfd p = {.fd = efd, .events = POLLIN};
            if (poll(&p, 1, 10000) <= 0) {
                printf("ENGINE-TEST FAIL: INTx: no interrupt within 10 s for queue %d (record status %d, INTX_STATUS "
                       "%#x, Status %#x)\n",
                       qn, c[0], v->regs[0x18 / 4], cfg_read16(v, 6));
                return 1;
            }
            uint64_t x;
            if (read(efd, &x, 8) != 8)
                return vf_fail("INTx eventfd read");
            uint32_t is = v->regs[0x18 / 4];
            uint16_t status = cfg_read16(v, 6);
            if (is != 1u << qn || !(status & 0x8)) {
                printf("ENGINE-TEST FAIL: INTx: queue %d interrupted with INTX_STATUS %#x, Status %#x (expected "
                       "INTX_STATUS %#x and Status bit 3)\n",
                       qn, is, status, 1u << qn);
                return 1;
            }
            v->regs[0x18 / 4] = 1u << qn; /* acknowledge: the line drops */
            is = v->regs[0x18 / 4];
            status = cfg_read16(v, 6);
            if (is || (status & 0x8)) {
                printf("ENGINE-TEST FAIL: INTx: after clearing INTX_STATUS it reads %#x, Status %#x\n", is, status);
                return 1;
            }
            if (vf_check_copy(v, c)) {
                printf("ENGINE-TEST FAIL: INTx: queue %d's copy (record status %d)\n", qn, c[0]);
                return 1;
            }
            if (unmask_intx(v))
                return vf_fail("INTx unmask");
        }
    }
    long count;
    int lines = proc_interrupts("IRQ", "vfio-intx", bdf, &count, 1);
    if (lines != 1 || count - before != 4 * IRQ_ROUNDS) {
        printf("ENGINE-TEST FAIL: INTx: /proc/interrupts shows %d lines, count %ld more; expected one line, %d more\n",
               lines, lines ? count - before : 0, 4 * IRQ_ROUNDS);
        return 1;
    }
    set_irqs(v, VFIO_PCI_INTX_IRQ_INDEX, 0, NULL);
    close(efd);
    printf("ENGINE-TEST INTX PASS: %d interrupts, each with its queue's INTX_STATUS bit and Status bit 3, both clear "
           "after the write-1-to-clear, unmasked after each\n",
           4 * IRQ_ROUNDS);
    fflush(stdout);
    return 0;
}

/*
 * Bus mastering, set through the config region as a user-space driver
 * must: while it is off, a queued copy (no INTERRUPT flag) waits untouched
 * (no record, destination unwritten, HEAD still, the queue not halted);
 * once it is on, the copy runs.
 */
static int bme_test(struct vf *v)
{
    uint16_t cmd = cfg_read16(v, 4);
    if (cfg_write16(v, 4, (cmd | 0x2) & ~0x4) || (cfg_read16(v, 4) & 0x4))
        return vf_fail("cannot clear bus mastering through the config region");
    vf_queues(v);
    volatile uint32_t *qb = v->regs + 0x100 / 4;
    uint32_t head = qb[0x14 / 4];
    volatile uint8_t *c = vf_submit(v, 0, 99, 0);
    usleep(200000);
    const uint8_t *dst = v->mem + 6 * PAGE;
    int untouched = 1;
    for (unsigned i = 0; i < PAGE; i++)
        untouched &= dst[i] == 0;
    uint32_t head_off = qb[0x14 / 4], qstatus = qb[0x1c / 4];
    if (c[0] || !untouched || head_off != head || qstatus != 1) {
        printf("ENGINE-TEST FAIL: BME: with bus mastering off: record status %d, destination %s, HEAD %u -> %u, "
               "Q_STATUS %#x\n",
               c[0], untouched ? "untouched" : "written", head, head_off, qstatus);
        return 1;
    }
    if (cfg_write16(v, 4, cmd | 0x6) || !(cfg_read16(v, 4) & 0x4))
        return vf_fail("cannot set bus mastering through the config region");
    if (vf_check_copy(v, c) || qb[0x14 / 4] != head + 1) {
        printf("ENGINE-TEST FAIL: BME: with bus mastering on the copy did not complete (record status %d, HEAD %u)\n",
               c[0], qb[0x14 / 4]);
        return 1;
    }
    printf("ENGINE-TEST BME PASS: with bus mastering off a queued copy waited 200 ms untouched (HEAD %u, Q_STATUS "
           "%#x); set through the config region, the copy ran\n",
           head_off, qstatus);
    fflush(stdout);
    return 0;
}

static int vfio_checks(const char *dev, const char *bdf)
{
    struct vf v;
    int r = vf_open(&v, dev, bdf);
    if (!r)
        r = bme_test(&v);
    if (!r)
        r = msi_test(&v, bdf);
    if (!r)
        r = intx_test(&v, bdf);
    vf_close(&v);
    return r;
}

static int wait_for(int present, char *dev, size_t n, char *bdf, size_t bn, double timeout_ms)
{
    double t0 = now_ms();
    while (!find_device_bdf(dev, n, bdf, bn) != !!present) {
        if (now_ms() - t0 > timeout_ms)
            return -1;
        usleep(20000);
    }
    return 0;
}

/*
 * `engine-test hotplug`: the host adds and removes the device (QMP
 * device_add / device_del on a PCIe root port; pciehp does the rest).
 * Each cycle: wait for the device, run the sysfs checks, then the vfio-pci
 * checks (MSI or MSI-X, then INTx), report, wait for it to go. It runs
 * until the host stops the machine.
 */
/* Prints the guest kernel's hot-plug log lines after the first *seen. */
static void klog_since(int *seen)
{
    FILE *f = popen("dmesg | grep -E 'pciehp|acpiphp'", "r");
    char line[512];
    int n = 0;
    if (!f)
        return;
    while (fgets(line, sizeof line, f))
        if (n++ >= *seen)
            printf("ENGINE-TEST KLOG: %s", line);
    pclose(f);
    *seen = n;
    fflush(stdout);
}

static int hotplug(void)
{
    char dev[512], bdf[256];
    int klog_lines = 0;
    for (int cycle = 1;; cycle++) {
        printf("ENGINE-TEST HOTPLUG WAITING %d: for the device to appear\n", cycle);
        fflush(stdout);
        if (wait_for(1, dev, sizeof dev, bdf, sizeof bdf, 600000))
            return fail("hotplug: the device did not appear within 600 s");
        printf("ENGINE-TEST HOTPLUG ADDED %d: %s\n", cycle, bdf);
        fflush(stdout);
        /* pciehp adds the device before its resource files; give them a moment. */
        char path[600];
        snprintf(path, sizeof path, "%s/resource2", dev);
        for (int i = 0; i < 500 && access(path, F_OK); i++)
            usleep(10000);
        if (sysfs_checks(dev))
            return 1;
        sysfs_release(dev);
        if (vfio_checks(dev, bdf))
            return 1;
        printf("ENGINE-TEST HOTPLUG USED %d: sysfs and vfio-pci checks passed on %s\n", cycle, bdf);
        fflush(stdout);
        if (wait_for(0, dev, sizeof dev, bdf, sizeof bdf, 600000))
            return fail("hotplug: the device did not go within 600 s");
        klog_since(&klog_lines);
        printf("ENGINE-TEST HOTPLUG REMOVED %d: no 1b36:d3a0 device left\n", cycle);
        fflush(stdout);
    }
}

/*
 * `engine-test sizes`: single COPY descriptors of growing sizes on queue 0
 * (4 KiB, 64 KiB, 256 KiB + 13, 1 MiB, 16 MiB), each between two physically
 * contiguous buffers made of 2 MiB huge pages (the kernel command line
 * reserves them with hugepages=N; the longest physically contiguous run of
 * them is used). Each copy waits for its completion record at most 20 s
 * (polling guest memory only: no register access while it runs); on a
 * timeout it reads HEAD and Q_STATUS, then submits a 4 KiB copy on the same
 * queue to see whether the queue still works. Then 4 MiB copies on the four
 * queues at once; then Q_CTRL 0 while a 16 MiB copy runs, and 100 times
 * Q_CTRL 0 and a HEAD read while a 1 MiB copy runs (the time each takes:
 * the vCPU waits for the reply while the device waits for the queue's
 * current DMA step), then a 4 KiB copy. Lines: "ENGINE-TEST SIZE ...".
 * Between the growing copies and the four queues: copies per second of
 * 64 KiB and of 1 MiB (rate() below; "ENGINE-TEST RATE ..."). Ends with
 * "ENGINE-TEST SIZE PASS" or "ENGINE-TEST SIZE FAIL". scripts/qemu-e2e.sh
 * runs it on shared memfd RAM and on QEMU's default RAM (DMA through
 * DMA_READ/DMA_WRITE messages).
 */
struct hp {
    uint8_t *v;
    uint64_t pa;
};

static int hp_cmp(const void *x, const void *y)
{
    const struct hp *a = x, *b = y;
    return a->pa < b->pa ? -1 : a->pa > b->pa;
}

#define HUGE (2u << 20)
static struct hp *run_pages;
static uint8_t *at(uint64_t off)
{
    return run_pages[off / HUGE].v + off % HUGE;
}

/* Submits d on queue 0 and waits at most timeout_ms for its record; 0 on a record. */
static int run_timed(struct desc d, uint8_t *status, double timeout_ms, double *took)
{
    double t0 = now_ms();
    volatile uint8_t *c = submit(d);
    for (long i = 0;; i++) {
        if (c[0]) {
            __sync_synchronize();
            *status = c[0];
            *took = now_ms() - t0;
            return 0;
        }
        if (i % 256 == 255 && now_ms() - t0 > timeout_ms) {
            *took = now_ms() - t0;
            return -1;
        }
        if (i > 1000)
            usleep(100);
    }
}

/*
 * Copies per second for a fixed workload: count COPY descriptors of len
 * bytes on queue 0, from the start of the huge-page run to its second half
 * (offset half), kept RATE_DEPTH in flight (the ring holds 16), each with
 * its own completion record. Every record must say SUCCESS and the
 * destination must hold the source afterwards. Waits at most 60 s in all.
 * Prints "ENGINE-TEST RATE <len> <copies/s> (...)"; 0 if all went well.
 */
#define RATE_DEPTH 8
static int rate(uint64_t run_pa, uint64_t half, uint32_t len, int count, int tag)
{
    for (uint64_t i = 0; i < len; i++) {
        *at(i) = (uint8_t)(i * 31 + tag);
        *at(half + i) = 0;
    }
    struct desc d = {.op = 1, .len = len, .src = run_pa, .dst = run_pa + half};
    volatile uint8_t *recs[16];
    int submitted = 0, done = 0, errors = 0;
    uint32_t first = tail;
    double t0 = now_ms();
    for (long i = 0; done < count; i++) {
        while (submitted < count && submitted - done < RATE_DEPTH) {
            recs[(first + submitted) % 16] = submit(d);
            submitted++;
        }
        volatile uint8_t *c = recs[(first + done) % 16];
        if (c[0]) {
            __sync_synchronize();
            errors += c[0] != 1;
            done++;
            i = 0;
            continue;
        }
        if (i % 256 == 255 && now_ms() - t0 > 60000) {
            printf("ENGINE-TEST RATE %u: NO COMPLETION of copy %d of %d after %.0f ms (HEAD %u, tail %u, "
                   "Q_STATUS %#x)\n",
                   len, done + 1, count, now_ms() - t0, q[0x14 / 4], tail, q[0x1c / 4]);
            fflush(stdout);
            return 1;
        }
        if (i > 1000)
            usleep(50);
    }
    double ms = now_ms() - t0;
    uint64_t wrong = len;
    for (uint64_t i = 0; i < len; i++)
        if (*at(half + i) != (uint8_t)(i * 31 + tag)) {
            wrong = i;
            break;
        }
    printf("ENGINE-TEST RATE %u %.1f (%d copies, %d in flight, %.1f ms, %.1f MiB/s, %d errors, %s)\n", len,
           count / (ms / 1e3), count, RATE_DEPTH, ms, (double)len * count / (ms / 1e3) / (1 << 20), errors,
           wrong == len ? "contents match" : "CONTENTS DIFFER");
    fflush(stdout);
    return errors || wrong != len;
}

/* The rate workload's counts: ioasid_rate=N64K,N1M on the kernel command line, else 4096 and 512. */
static void rate_counts(int *n64k, int *n1m)
{
    char line[4096] = "";
    *n64k = 4096;
    *n1m = 512;
    FILE *f = fopen("/proc/cmdline", "r");
    if (!f)
        return;
    if (fgets(line, sizeof line, f)) {
        const char *p = strstr(line, "ioasid_rate=");
        int a, b;
        if (p && sscanf(p, "ioasid_rate=%d,%d", &a, &b) == 2 && a > 0 && b > 0) {
            *n64k = a;
            *n1m = b;
        }
    }
    fclose(f);
}

static int sizes(const char *dev)
{
    if (sysfs_setup(dev))
        return 1;
    int n = 0;
    FILE *f = fopen("/proc/sys/vm/nr_hugepages", "r");
    if (!f || fscanf(f, "%d", &n) != 1)
        n = 0;
    if (f)
        fclose(f);
    if (n < 2)
        return fail("no huge pages (boot with hugepages=N)");
    uint8_t *big = mmap(NULL, (size_t)n * HUGE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_LOCKED | MAP_POPULATE, -1, 0);
    if (big == MAP_FAILED)
        return fail("cannot map the huge pages");
    struct hp *pages = calloc(n, sizeof *pages);
    for (int i = 0; i < n; i++) {
        pages[i].v = big + (size_t)i * HUGE;
        pages[i].v[0] = 1;
        pages[i].pa = phys_of(pages[i].v);
        if (!pages[i].pa)
            return fail("no physical address for a huge page");
    }
    qsort(pages, n, sizeof *pages, hp_cmp);
    int best = 0, blen = 1;
    for (int i = 0, s0 = 0; i < n; i++) {
        if (i > 0 && pages[i].pa != pages[i - 1].pa + HUGE)
            s0 = i;
        if (i - s0 + 1 > blen) {
            blen = i - s0 + 1;
            best = s0;
        }
    }
    run_pages = pages + best;
    uint64_t run_len = (uint64_t)blen * HUGE, run_pa = run_pages[0].pa;
    printf("ENGINE-TEST SIZE RUN: %d huge pages, longest contiguous run %llu MiB at %#llx\n", n,
           (unsigned long long)(run_len >> 20), (unsigned long long)run_pa);
    fflush(stdout);

    setup_queue0();

    static const uint32_t lens[] = {4096, 65536, 262144 + 13, 1u << 20, 16u << 20};
    int bad = 0;
    for (unsigned k = 0; k < sizeof lens / sizeof lens[0]; k++) {
        uint32_t len = lens[k];
        uint64_t half = (run_len / 2) & ~(uint64_t)(HUGE - 1);
        if (len > half) {
            printf("ENGINE-TEST SIZE %u: skipped (contiguous run too short)\n", len);
            continue;
        }
        for (uint64_t i = 0; i < len; i++) {
            *at(i) = (uint8_t)(i * 13 + k + 1);
            *at(half + i) = 0;
        }
        struct desc d = {.op = 1, .len = len, .src = run_pa, .dst = run_pa + half};
        uint8_t st = 0;
        double took = 0;
        if (run_timed(d, &st, 20000, &took)) {
            uint32_t head = q[0x14 / 4], qs = q[0x1c / 4];
            printf("ENGINE-TEST SIZE %u: NO COMPLETION after %.0f ms (HEAD %u, tail %u, Q_STATUS %#x)\n", len, took,
                   head, tail, qs);
            fflush(stdout);
            struct desc s = {.op = 1, .len = PAGE, .src = a_pa, .dst = b_pa};
            if (run_timed(s, &st, 20000, &took))
                printf("ENGINE-TEST SIZE AFTER: a 4 KiB copy on the same queue: NO COMPLETION after %.0f ms (HEAD %u, "
                       "tail %u, Q_STATUS %#x)\n",
                       took, q[0x14 / 4], tail, q[0x1c / 4]);
            else
                printf("ENGINE-TEST SIZE AFTER: a 4 KiB copy on the same queue: status %u in %.1f ms\n", st, took);
            fflush(stdout);
            bad = 1;
            break;
        }
        uint64_t wrong = len;
        for (uint64_t i = 0; i < len; i++)
            if (*at(half + i) != (uint8_t)(i * 13 + k + 1)) {
                wrong = i;
                break;
            }
        printf("ENGINE-TEST SIZE %u: status %u in %.1f ms, %s\n", len, st, took,
               wrong == len ? "contents match" : "CONTENTS DIFFER");
        fflush(stdout);
        if (st != 1 || wrong != len)
            bad = 1;
    }
    if (!bad && run_len / 2 >= (1u << 20)) {
        int n64k, n1m;
        rate_counts(&n64k, &n1m);
        uint64_t half = (run_len / 2) & ~(uint64_t)(HUGE - 1);
        bad |= rate(run_pa, half, 64u << 10, n64k, 1);
        if (!bad)
            bad |= rate(run_pa, half, 1u << 20, n1m, 2);
    }
    if (!bad && run_len / 2 >= (16u << 20)) {
        /* 4 MiB copies on the four queues at once. */
        const uint32_t plen = 4u << 20;
        uint64_t half = (run_len / 2) & ~(uint64_t)(HUGE - 1);
        struct desc *rings[4] = {ring};
        uint64_t rpa[4] = {ring_pa};
        volatile uint32_t *qb[4];
        volatile uint8_t *recs[4];
        uint32_t tails[4];
        regs[0x10 / 4] = 1;
        for (int i = 0; i < 4; i++) {
            if (i && !(rings[i] = page(&rpa[i])))
                return fail("cannot get ring pages");
            qb[i] = regs + (0x100 + i * 0x40) / 4;
            qb[i][0x10 / 4] = 0;
            qb[i][0x00 / 4] = (uint32_t)rpa[i];
            qb[i][0x04 / 4] = (uint32_t)(rpa[i] >> 32);
            qb[i][0x08 / 4] = 16;
            qb[i][0x0c / 4] = 0;
            qb[i][0x10 / 4] = 1;
            tails[i] = qb[i][0x14 / 4];
            for (uint64_t k = 0; k < plen; k++) {
                *at((uint64_t)i * plen + k) = (uint8_t)(k * 7 + i + 1);
                *at(half + (uint64_t)i * plen + k) = 0;
            }
        }
        for (int i = 0; i < 4; i++) {
            uint32_t slot = tails[i] % 16;
            recs[i] = comp + i * 512 + slot * 32;
            memset((void *)recs[i], 0, 32);
            struct desc d = {.op = 1,
                             .len = plen,
                             .src = run_pa + (uint64_t)i * plen,
                             .dst = run_pa + half + (uint64_t)i * plen,
                             .completion = comp_pa + i * 512 + slot * 32};
            rings[i][slot] = d;
        }
        __sync_synchronize();
        double t0 = now_ms();
        for (int i = 0; i < 4; i++)
            bells[i * 2] = ++tails[i];
        int left = 4;
        while (left && now_ms() - t0 < 30000) {
            left = 0;
            for (int i = 0; i < 4; i++)
                left += !recs[i][0];
            usleep(100);
        }
        for (int i = 0; i < 4; i++) {
            uint64_t wrong = plen;
            if (recs[i][0] == 1)
                for (uint64_t k = 0; k < plen; k++)
                    if (*at(half + (uint64_t)i * plen + k) != (uint8_t)(k * 7 + i + 1)) {
                        wrong = k;
                        break;
                    }
            if (recs[i][0])
                printf("ENGINE-TEST SIZE PARALLEL q%d 4 MiB: status %u, %s\n", i, recs[i][0],
                       wrong == plen ? "contents match" : "CONTENTS DIFFER");
            else
                printf("ENGINE-TEST SIZE PARALLEL q%d 4 MiB: NO COMPLETION after %.0f ms (HEAD %u, tail %u, Q_STATUS %#x)\n",
                       i, now_ms() - t0, qb[i][0x14 / 4], tails[i], qb[i][0x1c / 4]);
            if (recs[i][0] != 1 || wrong != plen)
                bad = 1;
        }
        printf("ENGINE-TEST SIZE PARALLEL: %.1f ms\n", now_ms() - t0);
    }
    if (!bad) {
        /*
         * A register write while a queue step waits for the VMM to serve its
         * DMA: a 16 MiB copy, then Q_CTRL 0 (voids it; the device thread
         * waits for the step) while the vCPU waits for the write's reply.
         */
        uint64_t half = (run_len / 2) & ~(uint64_t)(HUGE - 1);
        uint32_t slot = tail % 16;
        volatile uint8_t *c = comp + slot * 32;
        memset((void *)c, 0, 32);
        struct desc d = {.op = 1, .len = 16u << 20, .src = run_pa, .dst = run_pa + half,
                         .completion = comp_pa + slot * 32};
        ring[slot] = d;
        __sync_synchronize();
        tail++;
        bells[0] = tail;
        usleep(5000);
        double t0 = now_ms();
        q[0x10 / 4] = 0;
        double t1 = now_ms();
        q[0x10 / 4] = 1;
        double t2 = now_ms();
        tail = q[0x14 / 4];
        printf("ENGINE-TEST SIZE CTRL: Q_CTRL 0 during a 16 MiB copy took %.1f ms, Q_CTRL 1 %.1f ms (record %u)\n",
               t1 - t0, t2 - t1, c[0]);
        /* The same, 100 times, with a register read right after the write. */
        double worst = 0;
        int slow = 0;
        for (int i = 0; i < 100; i++) {
            slot = tail % 16;
            struct desc d2 = d;
            d2.len = 1u << 20;
            d2.completion = comp_pa + slot * 32;
            ring[slot] = d2;
            __sync_synchronize();
            tail++;
            bells[0] = tail;
            usleep((i % 10) * 200);
            double u0 = now_ms();
            q[0x10 / 4] = 0;
            uint32_t h = q[0x14 / 4];
            double u1 = now_ms() - u0;
            (void)h;
            if (u1 > worst)
                worst = u1;
            if (u1 > 1000)
                slow++;
            q[0x10 / 4] = 1;
            tail = q[0x14 / 4];
        }
        printf("ENGINE-TEST SIZE CTRL LOOP: 100 x (Q_CTRL 0 + HEAD read during a 1 MiB copy): worst %.1f ms, %d over 1 s\n",
               worst, slow);
        fflush(stdout);
        struct desc sd = {.op = 1, .len = PAGE, .src = a_pa, .dst = b_pa};
        uint8_t st = 0;
        double took = 0;
        if (run_timed(sd, &st, 20000, &took)) {
            printf("ENGINE-TEST SIZE CTRL AFTER: NO COMPLETION of a 4 KiB copy (HEAD %u, tail %u, Q_STATUS %#x)\n",
                   q[0x14 / 4], tail, q[0x1c / 4]);
            bad = 1;
        } else {
            printf("ENGINE-TEST SIZE CTRL AFTER: a 4 KiB copy: status %u in %.1f ms\n", st, took);
        }
    }
    printf(bad ? "ENGINE-TEST SIZE FAIL\n" : "ENGINE-TEST SIZE PASS\n");
    fflush(stdout);
    return bad;
}

int main(int argc, char **argv)
{
    char dev[512];
    if (argc > 1 && !strcmp(argv[1], "hotplug"))
        return hotplug();
    if (find_device(dev, sizeof dev))
        return fail("no 1b36:d3a0 device in /sys/bus/pci/devices");
    if (argc > 1 && !strcmp(argv[1], "sizes"))
        return sizes(dev);
    if (sysfs_checks(dev))
        return 1;
    if (argc > 1 && !strcmp(argv[1], "restart"))
        return restart_phase(a, b, a_pa, b_pa);
    return 0;
}
