/*
 * The NVMe guest's own checks, run by the initramfs of
 * scripts/qemu-nvme-e2e.sh on a Linux guest whose unmodified nvme driver
 * drives vfio-user-server's nvme controller through QEMU's vfio-user-pci.
 *
 *   nvme-test write DEV OFFSET LEN SEED   write a pattern with O_DIRECT,
 *                                         read it back with O_DIRECT, compare
 *   nvme-test check DEV OFFSET LEN SEED   read with O_DIRECT and compare
 *   nvme-test rate DEV MODE SIZE COUNT THREADS
 *                                         O_DIRECT reads or writes (MODE:
 *                                         randread, seqread, seqwrite) of
 *                                         SIZE bytes, COUNT in all, by
 *                                         THREADS threads (the queue depth),
 *                                         prints IOPS and MB/s
 *
 * Every line it prints starts with "NVME-TEST"; a failed check prints
 * "NVME-TEST FAIL: ..." and exits 1. The pattern depends on the byte's
 * offset on the disk and the seed, so a block written to the wrong LBA or
 * a stale block both fail the comparison, and the host can compute the
 * same pattern to check the backing file.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1u << 20)

static int fail(const char *what)
{
    printf("NVME-TEST FAIL: %s: %s\n", what, strerror(errno));
    fflush(stdout);
    return 1;
}

/* Byte at disk offset `off` of the pattern of `seed` (the host's check in
 * scripts/qemu-nvme-e2e.sh computes the same with python3). */
static uint8_t pattern(uint64_t off, uint32_t seed)
{
    uint64_t x = (off / 8) * 0x9e3779b97f4a7c15ull + seed;
    x ^= x >> 29;
    return (uint8_t)(x >> (8 * (off % 8)));
}

static void *aligned(size_t len)
{
    void *p = NULL;
    if (posix_memalign(&p, 4096, len) != 0)
        return NULL;
    return p;
}

static int xfer(int fd, uint8_t *buf, uint64_t off, size_t len, int write_it)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = write_it ? pwrite(fd, buf + done, len - done, (off_t)(off + done))
                             : pread(fd, buf + done, len - done, (off_t)(off + done));
        if (n <= 0) {
            if (n == 0)
                errno = EIO;
            return -1;
        }
        done += (size_t)n;
    }
    return 0;
}

static int pattern_pass(const char *dev, uint64_t off, uint64_t len, uint32_t seed, int write_it)
{
    int fd = open(dev, (write_it ? O_RDWR : O_RDONLY) | O_DIRECT);
    if (fd < 0)
        return fail("open");
    uint8_t *buf = aligned(CHUNK);
    if (!buf)
        return fail("memory");
    if (write_it) {
        for (uint64_t at = 0; at < len; at += CHUNK) {
            size_t n = len - at < CHUNK ? (size_t)(len - at) : CHUNK;
            for (size_t i = 0; i < n; i++)
                buf[i] = pattern(off + at + i, seed);
            if (xfer(fd, buf, off + at, n, 1) < 0)
                return fail("O_DIRECT write");
        }
        if (fdatasync(fd) < 0)
            return fail("fdatasync");
    }
    for (uint64_t at = 0; at < len; at += CHUNK) {
        size_t n = len - at < CHUNK ? (size_t)(len - at) : CHUNK;
        memset(buf, 0xa5, n);
        if (xfer(fd, buf, off + at, n, 0) < 0)
            return fail("O_DIRECT read");
        for (size_t i = 0; i < n; i++) {
            if (buf[i] != pattern(off + at + i, seed)) {
                printf("NVME-TEST FAIL: byte at disk offset %llu is 0x%02x, not 0x%02x\n",
                       (unsigned long long)(off + at + i), buf[i], pattern(off + at + i, seed));
                return 1;
            }
        }
    }
    close(fd);
    free(buf);
    printf("NVME-TEST PATTERN %s OK: %llu bytes at %llu (seed %u)\n", write_it ? "WRITE" : "CHECK",
           (unsigned long long)len, (unsigned long long)off, seed);
    return 0;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

struct job {
    int fd, write_it, random;
    size_t size;
    uint64_t blocks, seed;
    unsigned first, count;
    int failed;
};

static void *run_job(void *arg)
{
    struct job *j = arg;
    uint8_t *buf = aligned(j->size);
    if (!buf) {
        j->failed = 1;
        return NULL;
    }
    memset(buf, 0x5a, j->size);
    uint64_t x = j->seed;
    for (unsigned i = 0; i < j->count; i++) {
        uint64_t b = (j->first + i) % j->blocks;
        if (j->random) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            b = x % j->blocks;
        }
        if (xfer(j->fd, buf, b * j->size, j->size, j->write_it) < 0) {
            j->failed = 1;
            break;
        }
    }
    free(buf);
    return NULL;
}

static int rate(const char *dev, const char *mode, size_t size, unsigned count, unsigned threads)
{
    int write_it = strcmp(mode, "seqwrite") == 0;
    int random = strcmp(mode, "randread") == 0;
    if ((!write_it && !random && strcmp(mode, "seqread") != 0) || threads == 0 || threads > 64 || size == 0 ||
        size % 4096 != 0) {
        printf("NVME-TEST FAIL: rate %s %zu %u %u\n", mode, size, count, threads);
        return 1;
    }
    int fd = open(dev, (write_it ? O_RDWR : O_RDONLY) | O_DIRECT);
    if (fd < 0)
        return fail("open");
    off_t end = lseek(fd, 0, SEEK_END);
    if (end < (off_t)size * 2)
        return fail("disk too small");
    /* The first half of the disk only: the second holds the e2e's data. */
    uint64_t blocks = (uint64_t)end / size / 2;
    struct job jobs[64];
    pthread_t tid[64];
    double t0 = now();
    for (unsigned t = 0; t < threads; t++) {
        unsigned n = count / threads + (t < count % threads);
        jobs[t] = (struct job){fd, write_it, random, size, blocks, 88172645463325252ull + t * 7919, t * (count / threads), n, 0};
        if (pthread_create(&tid[t], NULL, run_job, &jobs[t]) != 0)
            return fail("pthread_create");
    }
    int failed = 0;
    for (unsigned t = 0; t < threads; t++) {
        pthread_join(tid[t], NULL);
        failed |= jobs[t].failed;
    }
    double dt = now() - t0;
    close(fd);
    if (failed)
        return fail(write_it ? "write" : "read");
    printf("NVME-TEST RATE %s %s %zu x%u: %u in %.3f s, %.0f IOPS, %.1f MB/s\n", dev, mode, size, threads, count, dt,
           count / dt, (double)count * (double)size / dt / 1e6);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 6 && (strcmp(argv[1], "write") == 0 || strcmp(argv[1], "check") == 0))
        return pattern_pass(argv[2], strtoull(argv[3], NULL, 0), strtoull(argv[4], NULL, 0),
                            (uint32_t)strtoul(argv[5], NULL, 0), argv[1][0] == 'w');
    if (argc == 7 && strcmp(argv[1], "rate") == 0)
        return rate(argv[2], argv[3], strtoull(argv[4], NULL, 0), (unsigned)strtoul(argv[5], NULL, 0),
                    (unsigned)strtoul(argv[6], NULL, 0));
    printf("NVME-TEST FAIL: usage: nvme-test write|check DEV OFFSET LEN SEED | rate DEV MODE SIZE COUNT THREADS\n");
    return 1;
}
