/*
 * overlapd/ring.h - the shared-memory ring of SPEC.md section 1, for native code.
 *
 * One header, no library: the layout constants, a reader, and helpers that
 * decode STEP record bodies. It compiles as C11 and as C++ (GCC or Clang; the
 * `__atomic_*` builtins stand in for <stdatomic.h>, which C++ lacks). Linux
 * only: mmap, futex, CLOCK_MONOTONIC.
 *
 * Include this header before any system header, or build with -D_GNU_SOURCE:
 * strict -std=c11 hides syscall() and clock_gettime() otherwise.
 *
 * Minimal reader:
 *
 *     ovl_reader r; char err[256]; ovl_event ev;
 *     if (ovl_reader_open(&r, "/dev/shm/overlapd.ring", 0, err, sizeof err))
 *         die(err);
 *     static uint64_t buf[1 << 13];                  // 64 KiB, 8-aligned
 *     for (;;) {
 *         int rc = ovl_reader_next(&r, buf, sizeof buf, &ev, -1);
 *         if (rc == OVL_EV_RECORD && ev.type == OVL_TYPE_STEP) {
 *             ovl_step s;
 *             if (ovl_step_parse(buf, ev.length, &s) == 0) use(&s);
 *         } else if (rc == OVL_ERR_BUFSMALL) {
 *             grow buf to ev.length bytes and call again: nothing was consumed
 *         } ...
 *     }
 *     ovl_reader_close(&r);
 *
 * Threading: an ovl_reader belongs to one thread at a time. Any number of
 * readers, in any number of processes, may read one ring.
 *
 * What a reader reports, and why:
 *  - RECORD bodies are the record minus its 24-byte header, so their length
 *    is a multiple of 8 (STEP bodies end in their own pad).
 *  - Every gap in seq is reported as LOST [first, last] before the record
 *    that revealed it, so received seqs and lost ranges cover every seq once.
 *    A reader that starts live learns the seq due at tail by walking the
 *    intact records, so even a lap before its first record is exact.
 *  - EPOCH: the producer restarted (in place, or by replacing the file, which
 *    an idle reader notices by stat()ing the path every 100 ms). Reading
 *    resumes at tail as SPEC 1.4.5 says; the new epoch counts from seq 0, so
 *    records it wrote before the reader looked come out as LOST [0, n-1].
 *  - The file is mapped read-only. When the reader may write the file it
 *    also maps the first page writable, solely to count itself in `waiters`
 *    (SPEC: the producer wakes only registered sleepers); otherwise, or with
 *    OVL_STRICT_RDONLY, it polls at most 1 ms apart.
 *  - Not handled: a file truncated under a live mapping raises SIGBUS, as
 *    with any mmap. The producer never does that (it replaces the file).
 */
#ifndef OVERLAPD_RING_H
#define OVERLAPD_RING_H

#if !defined(_GNU_SOURCE) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE 1
#endif

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "overlapd/ring.h maps the little-endian ring directly; big-endian hosts are not supported"
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Layout (SPEC 1.1, 1.2). Offsets are from the start of the file.           */
/* ------------------------------------------------------------------------ */

#define OVL_MAGIC "OVLDRING" /* 8 bytes, no terminator in the file */
#define OVL_MAGIC_LEN 8
#define OVL_VERSION 1u
#define OVL_HEADER_SIZE 8192u
#define OVL_MIN_CAPACITY 65536u
/* Not in the spec: a bound that keeps mapping sizes sane on a corrupt file. */
#define OVL_MAX_CAPACITY (1ull << 40)

#define OVL_OFF_MAGIC 0
#define OVL_OFF_VERSION 8        /* u32 */
#define OVL_OFF_HEADER_SIZE 12   /* u32 */
#define OVL_OFF_CAPACITY 16      /* u64 */
#define OVL_OFF_EPOCH 24         /* u64, nonzero */
#define OVL_OFF_PID 32           /* u32 */
#define OVL_OFF_FLAGS 36         /* u32 */
#define OVL_OFF_MAX_SLOTS 40     /* u32 */
#define OVL_OFF_VOCAB_SIZE 44    /* u32 */
#define OVL_OFF_RESERVED 48      /* 16 bytes, zero */
#define OVL_RESERVED_LEN 16
#define OVL_OFF_TAIL 64          /* u64 */
#define OVL_OFF_TAIL_INTENT 128  /* u64 */
#define OVL_OFF_HEAD 192         /* u64 */
#define OVL_OFF_NOTIFY 256       /* u32, futex word */
#define OVL_OFF_WAITERS 260      /* u32 */
#define OVL_OFF_HEARTBEAT 320    /* u64, CLOCK_MONOTONIC ns */
#define OVL_OFF_MODEL_NAME 384   /* 256 bytes UTF-8, zero padded */
#define OVL_MODEL_NAME_LEN 256
#define OVL_OFF_SLOTS 4096       /* reader slots for backpressure mode */
#define OVL_NUM_SLOTS 64
#define OVL_SLOT_SIZE 64
#define OVL_SLOT_OFF_CURSOR 0    /* u64 */
#define OVL_SLOT_OFF_PID 8       /* u32 */
#define OVL_SLOT_OFF_ACTIVE 12   /* u32 */

#define OVL_FLAG_CLOSED 1u       /* flags bit 0: the producer closed cleanly */

#define OVL_REC_HEADER 24
#define OVL_REC_OFF_LENGTH 0     /* u32, whole record, multiple of 8 */
#define OVL_REC_OFF_TYPE 4       /* u16 */
#define OVL_REC_OFF_RESERVED 6   /* u16, zero */
#define OVL_REC_OFF_SEQ 8        /* u64 */
#define OVL_REC_OFF_PUBLISH_NS 16 /* u64 */
#define OVL_REC_ALIGN 8
#define OVL_PAD_MIN 8            /* a PAD may be only length + type */

#define OVL_TYPE_PAD 0
#define OVL_TYPE_STEP 1

/* ------------------------------------------------------------------------ */
/* Return codes. Events are positive, errors negative.                       */
/* ------------------------------------------------------------------------ */

#define OVL_EV_RECORD 1        /* seq, publish_ns, type, length (body bytes copied) */
#define OVL_EV_LOST 2          /* first, last: seqs this reader will never see */
#define OVL_EV_EPOCH 3         /* epoch: the producer restarted; reading resumed at tail */
#define OVL_EV_PRODUCER_GONE 4 /* heartbeat stale and no clean close */
#define OVL_EV_CLOSED 5        /* producer closed cleanly and everything was read */
#define OVL_EV_TIMEOUT 6

#define OVL_ERR_BUFSMALL -1  /* ev.length = body size needed; nothing consumed */
#define OVL_ERR_CORRUPT -2   /* a record that is not torn but malformed; skipped to tail */
#define OVL_ERR_CLOSED -3    /* the reader is not open */
#define OVL_ERR_INVAL -4     /* bad argument */
#define OVL_ERR_TRUNCATED -5 /* STEP body shorter than its meta says */
#define OVL_ERR_ALIGN -6     /* STEP body pointer not 8-byte aligned */
#define OVL_ERR_FORMAT -7    /* STEP body fields out of range */
#define OVL_ERR_OPEN -8      /* ovl_reader_open failed; see its err text */

/* ovl_reader_open flags */
#define OVL_FROM_HEAD 1     /* start at the oldest intact record, not at tail */
#define OVL_BACKPRESSURE 2  /* claim a reader slot: the producer will not overwrite unread bytes */
#define OVL_STRICT_RDONLY 4 /* never map anything writable; poll (<= 1 ms) instead of futex wakeups */

#define OVL_PATH_MAX 4096
#define OVL_DEFAULT_STALE_MS 3000

/* Tunables of the wait loop. */
#define OVL_SPIN_NS 4000ll          /* default busy-wait before sleeping (ovl_reader_set_spin_ns) */
#define OVL_SLICE_NS 100000000ll    /* longest single sleep: epoch/death seen well within 1 s */
#define OVL_POLL_NS 1000000ll       /* sleep bound when we cannot register as a waiter */
#define OVL_STAT_EVERY_NS 100000000ll /* how often an idle reader stats its path */
#define OVL_MAX_LAPS 4              /* consecutive laps before giving up on head and going to tail */

typedef struct ovl_event {
    int kind;            /* OVL_EV_* or OVL_ERR_*, same as the return value */
    uint32_t type;       /* RECORD: record type (1 = STEP) */
    uint64_t seq;        /* RECORD; BUFSMALL */
    uint64_t publish_ns; /* RECORD: CLOCK_MONOTONIC at commit */
    uint64_t length;     /* RECORD: body bytes copied; BUFSMALL: body bytes needed */
    uint64_t first;      /* LOST: first missing seq */
    uint64_t last;       /* LOST: last missing seq (inclusive) */
    uint64_t epoch;      /* EPOCH: the new epoch */
} ovl_event;

typedef struct ovl_reader {
    uint8_t *base;       /* whole file, read-only unless OVL_BACKPRESSURE; NULL when closed */
    size_t map_len;
    uint8_t *hdr_rw;     /* first page mapped writable, only to bump `waiters`; may be NULL */
    size_t hdr_rw_len;
    uint64_t capacity;
    uint64_t epoch;      /* the epoch this reader follows */
    uint64_t cursor;     /* stream position of the next record to read */
    uint64_t next_seq;   /* seq expected next; meaningful when seq_known */
    uint64_t lost_total;
    int64_t stale_ns;    /* heartbeat age that means "producer gone" */
    int64_t spin_ns;     /* busy-wait this long for a record before sleeping */
    int64_t last_stat_ns;
    uint64_t dev, ino;   /* identity of the mapped file, to notice replacement */
    int flags;
    int slot;            /* claimed reader slot, -1 if none */
    int seq_known;
    int gone_reported;
    int closed_reported;
    int interrupt;       /* set (atomically) from another thread to end a wait early */
    char path[OVL_PATH_MAX];
} ovl_reader;

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */
/* ------------------------------------------------------------------------ */

static inline uint64_t ovl_align8(uint64_t n) { return (n + 7u) & ~(uint64_t)7u; }

static inline int64_t ovl_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

static inline uint64_t *ovl__u64(const void *base, size_t off)
{
    return (uint64_t *)(void *)((uint8_t *)(uintptr_t)base + off);
}

static inline uint32_t *ovl__u32(const void *base, size_t off)
{
    return (uint32_t *)(void *)((uint8_t *)(uintptr_t)base + off);
}

static inline uint8_t *ovl__slot(const void *base, int i)
{
    return (uint8_t *)(uintptr_t)base + OVL_OFF_SLOTS + (size_t)i * OVL_SLOT_SIZE;
}

static inline void ovl__cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

static inline void ovl__sleep_ns(int64_t ns)
{
    struct timespec ts;
    if (ns <= 0) return;
    ts.tv_sec = (time_t)(ns / 1000000000ll);
    ts.tv_nsec = (long)(ns % 1000000000ll);
    nanosleep(&ts, NULL);
}

/* Shared (not PRIVATE) futex: writer and readers are different processes. */
static inline void ovl__futex_wait(uint32_t *addr, uint32_t val, int64_t ns)
{
    struct timespec ts;
    if (ns <= 0) return;
    ts.tv_sec = (time_t)(ns / 1000000000ll);
    ts.tv_nsec = (long)(ns % 1000000000ll);
    syscall(SYS_futex, addr, FUTEX_WAIT, val, &ts, NULL, 0);
}

static inline const char *ovl_strerror(int code)
{
    switch (code) {
    case OVL_ERR_BUFSMALL: return "record larger than the buffer (event length holds the size needed)";
    case OVL_ERR_CORRUPT: return "malformed record in the ring (not a torn read); skipped to tail";
    case OVL_ERR_CLOSED: return "reader is not open";
    case OVL_ERR_INVAL: return "invalid argument";
    case OVL_ERR_TRUNCATED: return "STEP body shorter than its meta describes";
    case OVL_ERR_ALIGN: return "STEP body not 8-byte aligned";
    case OVL_ERR_FORMAT: return "STEP body field out of range";
    case OVL_ERR_OPEN: return "could not open the ring";
    default: return "unknown error";
    }
}

/* ------------------------------------------------------------------------ */
/* Header accessors (valid while the reader is open)                         */
/* ------------------------------------------------------------------------ */

static inline uint64_t ovl_reader_tail(const ovl_reader *r)
{ return __atomic_load_n(ovl__u64(r->base, OVL_OFF_TAIL), __ATOMIC_ACQUIRE); }
static inline uint64_t ovl_reader_head(const ovl_reader *r)
{ return __atomic_load_n(ovl__u64(r->base, OVL_OFF_HEAD), __ATOMIC_ACQUIRE); }
static inline uint64_t ovl_reader_heartbeat_ns(const ovl_reader *r)
{ return __atomic_load_n(ovl__u64(r->base, OVL_OFF_HEARTBEAT), __ATOMIC_RELAXED); }
static inline uint32_t ovl_reader_flags(const ovl_reader *r)
{ return __atomic_load_n(ovl__u32(r->base, OVL_OFF_FLAGS), __ATOMIC_ACQUIRE); }
static inline uint32_t ovl_reader_pid(const ovl_reader *r)
{ return __atomic_load_n(ovl__u32(r->base, OVL_OFF_PID), __ATOMIC_RELAXED); }
static inline uint32_t ovl_reader_max_slots(const ovl_reader *r)
{ return __atomic_load_n(ovl__u32(r->base, OVL_OFF_MAX_SLOTS), __ATOMIC_RELAXED); }
static inline uint32_t ovl_reader_vocab_size(const ovl_reader *r)
{ return __atomic_load_n(ovl__u32(r->base, OVL_OFF_VOCAB_SIZE), __ATOMIC_RELAXED); }

/* Copies the model name (at most 255 bytes plus a terminator) into out. */
static inline void ovl_reader_model_name(const ovl_reader *r, char *out, size_t outlen)
{
    size_t n = 0;
    const char *src = (const char *)r->base + OVL_OFF_MODEL_NAME;
    if (!outlen) return;
    while (n + 1 < outlen && n < OVL_MODEL_NAME_LEN && src[n]) {
        out[n] = src[n];
        n++;
    }
    out[n] = 0;
}

static inline void ovl_reader_set_stale_ms(ovl_reader *r, int64_t ms)
{
    r->stale_ns = (ms > 0 ? ms : OVL_DEFAULT_STALE_MS) * 1000000ll;
}

/* How long a waiting reader spins before it sleeps on the futex. Longer
 * spins trade a core for latency: a sleeping reader pays the futex wake-up
 * (tens of microseconds on a busy host), a spinning one only a cache miss. */
static inline void ovl_reader_set_spin_ns(ovl_reader *r, int64_t ns)
{
    r->spin_ns = ns >= 0 ? ns : OVL_SPIN_NS;
}

/* Makes a wait in ovl_reader_next (on another thread) return TIMEOUT soon. */
static inline void ovl_reader_interrupt(ovl_reader *r)
{
    __atomic_store_n(&r->interrupt, 1, __ATOMIC_RELEASE);
}

/* ------------------------------------------------------------------------ */
/* Opening                                                                  */
/* ------------------------------------------------------------------------ */

/* One validated mapping of a ring file; ovl_reader_open and the
 * file-replaced path both build one before touching the reader. */
typedef struct ovl__map {
    uint8_t *base;
    size_t map_len;
    uint8_t *hdr_rw;
    size_t hdr_rw_len;
    uint64_t capacity, epoch, dev, ino;
} ovl__map;

static inline void ovl__unmap(ovl__map *m)
{
    if (m->hdr_rw) munmap(m->hdr_rw, m->hdr_rw_len);
    if (m->base) munmap(m->base, m->map_len);
    memset(m, 0, sizeof *m);
}

static inline int ovl__fail(char *err, size_t errlen, const char *fmt, const char *path,
                            unsigned long long a, unsigned long long b)
{
    if (err && errlen) snprintf(err, errlen, fmt, path, a, b);
    return OVL_ERR_OPEN;
}

static inline int ovl__map_open(ovl__map *m, const char *path, int flags, char *err, size_t errlen)
{
    const int bp = (flags & OVL_BACKPRESSURE) != 0;
    const int oflags = O_CLOEXEC | O_NOCTTY | O_NONBLOCK; /* NONBLOCK: a FIFO must not hang us */
    int fd = -1, rw = 0;
    struct stat st;
    unsigned char hdr[64];
    uint32_t version, header_size;
    uint64_t capacity;
    ssize_t got;
    int i;

    memset(m, 0, sizeof *m);
    /* Write access is needed for a backpressure slot, and wanted (not
     * needed) to register in `waiters` so the producer wakes us. */
    if (bp || !(flags & OVL_STRICT_RDONLY)) {
        fd = open(path, O_RDWR | oflags);
        if (fd >= 0) rw = 1;
        else if (bp || (errno != EACCES && errno != EPERM && errno != EROFS && errno != EISDIR &&
                        errno != ETXTBSY))
            goto open_failed;
    }
    if (fd < 0) {
        fd = open(path, O_RDONLY | oflags);
        if (fd < 0) goto open_failed;
    }
    if (fstat(fd, &st) != 0) {
        close(fd);
        return ovl__fail(err, errlen, "%s: cannot stat the ring file", path, 0, 0);
    }
    if (S_ISDIR(st.st_mode)) {
        close(fd);
        return ovl__fail(err, errlen, "%s: is a directory, not an overlapd ring file", path, 0, 0);
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return ovl__fail(err, errlen, "%s: not a regular file, so not an overlapd ring", path, 0, 0);
    }
    if (st.st_size == 0) {
        close(fd);
        return ovl__fail(err, errlen, "%s: file is empty, not an overlapd ring", path, 0, 0);
    }
    if ((unsigned long long)st.st_size < OVL_HEADER_SIZE) {
        close(fd);
        return ovl__fail(err, errlen,
                         "%s: too small to be an overlapd ring (%llu bytes; the header alone is %llu)",
                         path, (unsigned long long)st.st_size, OVL_HEADER_SIZE);
    }
    got = pread(fd, hdr, sizeof hdr, 0);
    if (got != (ssize_t)sizeof hdr) {
        close(fd);
        return ovl__fail(err, errlen, "%s: cannot read the ring header", path, 0, 0);
    }
    if (memcmp(hdr + OVL_OFF_MAGIC, OVL_MAGIC, OVL_MAGIC_LEN) != 0) {
        close(fd);
        return ovl__fail(err, errlen, "%s: not an overlapd ring (bad magic, expected OVLDRING)",
                         path, 0, 0);
    }
    memcpy(&version, hdr + OVL_OFF_VERSION, 4);
    memcpy(&header_size, hdr + OVL_OFF_HEADER_SIZE, 4);
    memcpy(&capacity, hdr + OVL_OFF_CAPACITY, 8);
    if (version != OVL_VERSION) {
        close(fd);
        return ovl__fail(err, errlen,
                         "%s: ring version %llu is not supported (this reader speaks version %llu)",
                         path, version, OVL_VERSION);
    }
    if (header_size != OVL_HEADER_SIZE) {
        close(fd);
        return ovl__fail(err, errlen, "%s: bad ring header_size %llu (expected %llu)", path,
                         header_size, OVL_HEADER_SIZE);
    }
    if (capacity < OVL_MIN_CAPACITY || (capacity & (capacity - 1)) || capacity > OVL_MAX_CAPACITY) {
        close(fd);
        return ovl__fail(err, errlen,
                         "%s: bad ring capacity %llu (must be a power of two >= %llu)", path,
                         capacity, OVL_MIN_CAPACITY);
    }
    if ((unsigned long long)st.st_size < OVL_HEADER_SIZE + capacity) {
        close(fd);
        return ovl__fail(err, errlen, "%s: ring file truncated (%llu bytes, expected %llu)", path,
                         (unsigned long long)st.st_size, OVL_HEADER_SIZE + capacity);
    }
    m->map_len = (size_t)(OVL_HEADER_SIZE + capacity);
    m->base = (uint8_t *)mmap(NULL, m->map_len, PROT_READ | (bp ? PROT_WRITE : 0), MAP_SHARED, fd, 0);
    if (m->base == (uint8_t *)MAP_FAILED) {
        m->base = NULL;
        close(fd);
        return ovl__fail(err, errlen, "%s: cannot map the ring (%llu bytes)", path,
                         (unsigned long long)m->map_len, 0);
    }
    if (rw && !bp) {
        /* Only the first page is writable, and only `waiters` is written. */
        long pg = sysconf(_SC_PAGESIZE);
        m->hdr_rw_len = (size_t)(pg > 0 ? pg : 4096);
        if (m->hdr_rw_len > m->map_len) m->hdr_rw_len = m->map_len;
        m->hdr_rw = (uint8_t *)mmap(NULL, m->hdr_rw_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m->hdr_rw == (uint8_t *)MAP_FAILED) m->hdr_rw = NULL; /* fall back to polling */
    }
    close(fd); /* the mappings keep the file alive */
    m->capacity = capacity;
    m->dev = (uint64_t)st.st_dev;
    m->ino = (uint64_t)st.st_ino;
    /* Epoch 0 means a producer is re-initialising the ring in place. */
    for (i = 0; i < 200; i++) {
        m->epoch = __atomic_load_n(ovl__u64(m->base, OVL_OFF_EPOCH), __ATOMIC_ACQUIRE);
        if (m->epoch) return 0;
        ovl__sleep_ns(1000000);
    }
    ovl__unmap(m);
    return ovl__fail(err, errlen, "%s: ring epoch is 0 (a producer is still initialising it)", path,
                     0, 0);

open_failed:
    {
        int e = errno;
        if (e == ENOENT)
            return ovl__fail(err, errlen, "%s: no such file (is the overlapd producer running?)",
                             path, 0, 0);
        if (e == EACCES || e == EPERM)
            return ovl__fail(err, errlen,
                             bp ? "%s: permission denied (backpressure needs write access)"
                                : "%s: permission denied",
                             path, 0, 0);
        if (e == EISDIR)
            return ovl__fail(err, errlen, "%s: is a directory, not an overlapd ring file", path, 0, 0);
        if (err && errlen) snprintf(err, errlen, "%s: cannot open: %s", path, strerror(e));
        return OVL_ERR_OPEN;
    }
}

/* ------------------------------------------------------------------------ */
/* Backpressure slot                                                        */
/* ------------------------------------------------------------------------ */

static inline void ovl__publish_cursor(ovl_reader *r)
{
    if (r->slot >= 0)
        __atomic_store_n(ovl__u64(ovl__slot(r->base, r->slot), OVL_SLOT_OFF_CURSOR), r->cursor,
                         __ATOMIC_RELEASE);
}

/* Claims a free slot (CAS active 0 -> 1, then cursor, then pid). The
 * cursor starts at head, the most the producer can still be asked to keep,
 * and the caller moves it to where reading really starts. The producer
 * ignores a slot whose pid is still 0 and uses its own tail in its place;
 * the seq_cst store and fence pair with the producer's fence before its
 * scan (Dekker), so either it sees our pid or we position ourselves after
 * reading a tail at least as new as the one it used. A from-head reader may
 * therefore still lose records written before its slot became visible; the
 * loss is reported like any other. */
static inline int ovl__claim_slot(ovl_reader *r)
{
    const uint32_t pid = (uint32_t)getpid();
    int i;
    for (i = 0; i < OVL_NUM_SLOTS; i++) {
        uint8_t *s = ovl__slot(r->base, i);
        uint32_t expect = 0;
        if (__atomic_compare_exchange_n(ovl__u32(s, OVL_SLOT_OFF_ACTIVE), &expect, 1u, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            __atomic_store_n(ovl__u64(s, OVL_SLOT_OFF_CURSOR),
                             __atomic_load_n(ovl__u64(r->base, OVL_OFF_HEAD), __ATOMIC_ACQUIRE),
                             __ATOMIC_RELAXED);
            __atomic_store_n(ovl__u32(s, OVL_SLOT_OFF_PID), pid, __ATOMIC_SEQ_CST);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            r->slot = i;
            return 0;
        }
    }
    return -1;
}

static inline void ovl__release_slot(ovl_reader *r)
{
    uint8_t *s;
    if (r->slot < 0 || !r->base) return;
    s = ovl__slot(r->base, r->slot);
    /* If the producer evicted us and someone else claimed the slot, leave it. */
    if (__atomic_load_n(ovl__u32(s, OVL_SLOT_OFF_PID), __ATOMIC_ACQUIRE) == (uint32_t)getpid()) {
        __atomic_store_n(ovl__u32(s, OVL_SLOT_OFF_PID), 0u, __ATOMIC_RELAXED);
        __atomic_store_n(ovl__u32(s, OVL_SLOT_OFF_ACTIVE), 0u, __ATOMIC_RELEASE);
    }
    r->slot = -1;
}

/* The producer frees slots whose pid it cannot see (another pid namespace
 * looks dead to it). Notice that and claim a slot again. */
static inline void ovl__check_slot(ovl_reader *r)
{
    uint8_t *s;
    if (!(r->flags & OVL_BACKPRESSURE)) return;
    if (r->slot >= 0) {
        s = ovl__slot(r->base, r->slot);
        if (__atomic_load_n(ovl__u32(s, OVL_SLOT_OFF_ACTIVE), __ATOMIC_ACQUIRE) == 1u &&
            __atomic_load_n(ovl__u32(s, OVL_SLOT_OFF_PID), __ATOMIC_ACQUIRE) == (uint32_t)getpid())
            return;
        r->slot = -1;
    }
    if (ovl__claim_slot(r) == 0) ovl__publish_cursor(r);
}

/* ------------------------------------------------------------------------ */
/* Positioning                                                              */
/* ------------------------------------------------------------------------ */

/* Reads length and type of the record at stream position pos in one load,
 * so the two always come from the same write. */
static inline uint64_t ovl__rec_word(const ovl_reader *r, uint64_t pos)
{
    return __atomic_load_n(ovl__u64(r->base, OVL_HEADER_SIZE + (pos & (r->capacity - 1))),
                           __ATOMIC_RELAXED);
}

/* Whether a record of this length and type may start at pos. */
static inline int ovl__shape_ok(const ovl_reader *r, uint64_t pos, uint32_t len, uint32_t type)
{
    uint64_t room = r->capacity - (pos & (r->capacity - 1));
    if (len < OVL_PAD_MIN || (len & 7u) || len > room) return 0;
    if (type == OVL_TYPE_PAD) return len == room; /* PAD always runs to the end */
    return len >= OVL_REC_HEADER;
}

static inline int ovl__lapped(const ovl_reader *r, uint64_t pos)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return __atomic_load_n(ovl__u64(r->base, OVL_OFF_TAIL_INTENT), __ATOMIC_ACQUIRE) - pos >
           r->capacity;
}

/* Puts the cursor at tail (or head) and learns the seq expected there, so
 * that a lap before the first record is still reported with an exact range.
 * It walks the intact records from head; if the producer keeps lapping the
 * walk, the seq stays unknown and the first record read defines it. */
static inline void ovl__position(ovl_reader *r, int from_head)
{
    int attempt;
    for (attempt = 0; attempt < 8; attempt++) {
        const uint64_t epoch = __atomic_load_n(ovl__u64(r->base, OVL_OFF_EPOCH), __ATOMIC_ACQUIRE);
        const uint64_t h = ovl_reader_head(r);
        const uint64_t t = ovl_reader_tail(r);
        uint64_t pos = h, last = 0;
        int have_last = 0, ok = 1;
        if (epoch == 0 || (int64_t)(t - h) < 0) { ovl__sleep_ns(1000000); continue; }
        r->epoch = epoch;
        r->cursor = from_head ? h : t;
        while ((int64_t)(t - pos) > 0) {
            uint64_t w = ovl__rec_word(r, pos), seq = 0;
            uint32_t len = (uint32_t)w, type = (uint32_t)(w >> 32) & 0xFFFFu;
            int shape = ovl__shape_ok(r, pos, len, type);
            if (shape && type != OVL_TYPE_PAD)
                seq = __atomic_load_n(ovl__u64(r->base, OVL_HEADER_SIZE +
                                                            (pos & (r->capacity - 1)) + OVL_REC_OFF_SEQ),
                                      __ATOMIC_RELAXED);
            if (ovl__lapped(r, pos) || !shape) { ok = 0; break; }
            if (type != OVL_TYPE_PAD) {
                if (from_head) { /* the first record at head is where we start */
                    r->next_seq = seq;
                    r->seq_known = 1;
                    goto done;
                }
                last = seq;
                have_last = 1;
            }
            pos += len;
        }
        if (!ok || __atomic_load_n(ovl__u64(r->base, OVL_OFF_EPOCH), __ATOMIC_ACQUIRE) != epoch)
            continue;
        if (have_last) { r->next_seq = last + 1; r->seq_known = 1; }
        else if (t == 0) { r->next_seq = 0; r->seq_known = 1; }
        else r->seq_known = 0;
        goto done;
    }
    r->epoch = __atomic_load_n(ovl__u64(r->base, OVL_OFF_EPOCH), __ATOMIC_ACQUIRE);
    r->cursor = from_head ? ovl_reader_head(r) : ovl_reader_tail(r);
    r->seq_known = 0;
done:
    ovl__publish_cursor(r);
}

static inline void ovl__install(ovl_reader *r, const ovl__map *m)
{
    r->base = m->base;
    r->map_len = m->map_len;
    r->hdr_rw = m->hdr_rw;
    r->hdr_rw_len = m->hdr_rw_len;
    r->capacity = m->capacity;
    r->epoch = m->epoch;
    r->dev = m->dev;
    r->ino = m->ino;
}

static inline void ovl_reader_close(ovl_reader *r)
{
    ovl__map m;
    if (!r || !r->base) return;
    ovl__release_slot(r);
    m.base = r->base;
    m.map_len = r->map_len;
    m.hdr_rw = r->hdr_rw;
    m.hdr_rw_len = r->hdr_rw_len;
    ovl__unmap(&m);
    r->base = NULL;
    r->hdr_rw = NULL;
}

/* Opens and validates the ring at path. Returns 0, or OVL_ERR_OPEN /
 * OVL_ERR_INVAL with a sentence in err. Never crashes or hangs on a file
 * that is not a ring. */
static inline int ovl_reader_open(ovl_reader *r, const char *path, int flags, char *err,
                                  size_t errlen)
{
    ovl__map m;
    size_t n;
    int rc;
    if (err && errlen) err[0] = 0;
    if (!r) return OVL_ERR_INVAL;
    memset(r, 0, sizeof *r);
    r->slot = -1;
    if (!path || !path[0]) {
        if (err && errlen) snprintf(err, errlen, "ring path is empty");
        return OVL_ERR_INVAL;
    }
    n = strlen(path);
    if (n >= OVL_PATH_MAX) {
        if (err && errlen) snprintf(err, errlen, "ring path is longer than %d bytes", OVL_PATH_MAX - 1);
        return OVL_ERR_INVAL;
    }
    rc = ovl__map_open(&m, path, flags, err, errlen);
    if (rc) return rc;
    memcpy(r->path, path, n + 1);
    r->flags = flags;
    ovl_reader_set_stale_ms(r, OVL_DEFAULT_STALE_MS);
    ovl_reader_set_spin_ns(r, OVL_SPIN_NS);
    ovl__install(r, &m);
    r->last_stat_ns = ovl_now_ns();
    if ((flags & OVL_BACKPRESSURE) && ovl__claim_slot(r) != 0) {
        ovl_reader_close(r);
        if (err && errlen) snprintf(err, errlen, "%s: no free reader slot (all %d in use)", path, OVL_NUM_SLOTS);
        return OVL_ERR_OPEN;
    }
    ovl__position(r, (flags & OVL_FROM_HEAD) != 0);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Reading                                                                  */
/* ------------------------------------------------------------------------ */

#define OVL__AGAIN 0 /* internal: state changed, loop again */

static inline int ovl__epoch_event(ovl_reader *r, uint64_t epoch, ovl_event *ev)
{
    /* Spec 1.4.5: resync at tail. Records of the new epoch before tail are
     * reported as lost when the first record after them arrives, since the
     * new epoch's seq starts at 0. */
    r->epoch = epoch;
    r->cursor = ovl_reader_tail(r);
    r->next_seq = 0;
    r->seq_known = 1;
    r->gone_reported = 0;
    r->closed_reported = 0;
    ovl__publish_cursor(r);
    ev->kind = OVL_EV_EPOCH;
    ev->epoch = epoch;
    return OVL_EV_EPOCH;
}

/* If the path now names another file (the producer re-created the ring with
 * another size), switch to it and report its epoch. */
static inline int ovl__check_replaced(ovl_reader *r, ovl_event *ev, int64_t now)
{
    struct stat st;
    ovl__map m;
    int slot_wanted = (r->flags & OVL_BACKPRESSURE) != 0;
    r->last_stat_ns = now;
    if (stat(r->path, &st) != 0) return OVL__AGAIN;
    if ((uint64_t)st.st_ino == r->ino && (uint64_t)st.st_dev == r->dev) return OVL__AGAIN;
    if (ovl__map_open(&m, r->path, r->flags, NULL, 0) != 0) return OVL__AGAIN; /* not ready yet */
    ovl_reader_close(r);
    ovl__install(r, &m);
    r->slot = -1;
    if (slot_wanted) ovl__claim_slot(r); /* without a free slot we read lossy rather than not at all */
    return ovl__epoch_event(r, m.epoch, ev);
}

/* Reads the record at the cursor (tail is past it). Returns an event, an
 * error, or OVL__AGAIN after skipping a PAD or recovering from a lap. */
static inline int ovl__read_one(ovl_reader *r, void *buf, size_t bufcap, ovl_event *ev, int *laps)
{
    const uint64_t pos = r->cursor;
    const uint64_t off = pos & (r->capacity - 1);
    const uint8_t *p = r->base + OVL_HEADER_SIZE + off;
    const uint64_t w = __atomic_load_n(ovl__u64(p, 0), __ATOMIC_RELAXED);
    const uint32_t len = (uint32_t)w;
    const uint32_t type = (uint32_t)(w >> 32) & 0xFFFFu;
    const int shape = ovl__shape_ok(r, pos, len, type);
    uint64_t seq = 0, pns = 0, body = 0;
    int too_small = 0;

    if (shape && type != OVL_TYPE_PAD) {
        seq = __atomic_load_n(ovl__u64(p, OVL_REC_OFF_SEQ), __ATOMIC_RELAXED);
        pns = __atomic_load_n(ovl__u64(p, OVL_REC_OFF_PUBLISH_NS), __ATOMIC_RELAXED);
        body = len - OVL_REC_HEADER;
        if (body > bufcap) too_small = 1;
        else if (body) memcpy(buf, p + OVL_REC_HEADER, (size_t)body);
    }
    /* Spec 1.4.4: the copy is good only if the producer had not yet started
     * overwriting it, which tail_intent (loaded after a load-load fence)
     * tells. A changed epoch means the bytes may belong to a new producer. */
    if (ovl__lapped(r, pos)) {
        if (__atomic_load_n(ovl__u64(r->base, OVL_OFF_EPOCH), __ATOMIC_ACQUIRE) != r->epoch)
            return OVL__AGAIN;
        {
            uint64_t h = ovl_reader_head(r);
            /* head is past pos when we were lapped; if it is not, or we keep
             * being lapped from head, wait at tail: the next seq tells the loss. */
            if ((int64_t)(h - pos) <= 0 || ++*laps >= OVL_MAX_LAPS) h = ovl_reader_tail(r);
            r->cursor = h;
        }
        ovl__publish_cursor(r);
        return OVL__AGAIN;
    }
    if (__atomic_load_n(ovl__u64(r->base, OVL_OFF_EPOCH), __ATOMIC_ACQUIRE) != r->epoch)
        return OVL__AGAIN;
    if (!shape) {
        r->cursor = ovl_reader_tail(r);
        ovl__publish_cursor(r);
        ev->kind = OVL_ERR_CORRUPT;
        return OVL_ERR_CORRUPT;
    }
    if (type == OVL_TYPE_PAD) {
        r->cursor = pos + len;
        ovl__publish_cursor(r);
        return OVL__AGAIN;
    }
    if (r->seq_known && seq > r->next_seq) {
        /* Report the gap first; the record stays at the cursor and is read
         * (and validated) again on the next call. */
        ev->kind = OVL_EV_LOST;
        ev->first = r->next_seq;
        ev->last = seq - 1;
        r->lost_total += seq - r->next_seq;
        r->next_seq = seq;
        return OVL_EV_LOST;
    }
    if (r->seq_known && seq < r->next_seq) { /* already delivered: never deliver twice */
        r->cursor = pos + len;
        ovl__publish_cursor(r);
        return OVL__AGAIN;
    }
    if (too_small) {
        ev->kind = OVL_ERR_BUFSMALL;
        ev->seq = seq;
        ev->length = body;
        return OVL_ERR_BUFSMALL;
    }
    ev->kind = OVL_EV_RECORD;
    ev->seq = seq;
    ev->publish_ns = pns;
    ev->type = type;
    ev->length = body;
    r->cursor = pos + len;
    r->next_seq = seq + 1;
    r->seq_known = 1;
    ovl__publish_cursor(r);
    return OVL_EV_RECORD;
}

/* Checks made while caught up: clean close, producer death, replaced file. */
static inline int ovl__idle_checks(ovl_reader *r, ovl_event *ev, int64_t now)
{
    const uint32_t flags = ovl_reader_flags(r);
    if (now - r->last_stat_ns >= OVL_STAT_EVERY_NS) {
        int rc = ovl__check_replaced(r, ev, now);
        if (rc) return rc;
        ovl__check_slot(r);
    }
    if (flags & OVL_FLAG_CLOSED) {
        if (!r->closed_reported) {
            r->closed_reported = 1;
            ev->kind = OVL_EV_CLOSED;
            return OVL_EV_CLOSED;
        }
        return OVL__AGAIN;
    }
    r->closed_reported = 0;
    if (now - (int64_t)ovl_reader_heartbeat_ns(r) > r->stale_ns) {
        if (!r->gone_reported) {
            int rc = ovl__check_replaced(r, ev, now); /* a successor may already be there */
            if (rc) return rc;
            r->gone_reported = 1;
            ev->kind = OVL_EV_PRODUCER_GONE;
            return OVL_EV_PRODUCER_GONE;
        }
    } else {
        r->gone_reported = 0;
    }
    return OVL__AGAIN;
}

/* Sleeps until tail moves past `seen_tail` or the epoch changes, at most max_ns. */
static inline void ovl__wait(ovl_reader *r, uint64_t seen_tail, int64_t max_ns)
{
    uint64_t *tail = ovl__u64(r->base, OVL_OFF_TAIL);
    uint64_t *epoch = ovl__u64(r->base, OVL_OFF_EPOCH);
    const int64_t t0 = ovl_now_ns();
    uint32_t *notify, n;
    int i;
    for (i = 1;; i++) {
        if (__atomic_load_n(tail, __ATOMIC_ACQUIRE) != seen_tail) return;
        if (__atomic_load_n(epoch, __ATOMIC_ACQUIRE) != r->epoch) return;
        if ((i & 63) == 0 && ovl_now_ns() - t0 >= r->spin_ns) break;
        ovl__cpu_relax();
    }
    if (r->hdr_rw || (r->flags & OVL_BACKPRESSURE)) {
        uint8_t *h = r->hdr_rw ? r->hdr_rw : r->base;
        uint32_t *waiters = ovl__u32(h, OVL_OFF_WAITERS);
        notify = ovl__u32(h, OVL_OFF_NOTIFY);
        /* Load notify, then register, then re-check tail: the producer
         * stores tail, bumps notify and reads waiters, so either it sees us
         * and wakes us (or notify differs and the wait returns at once) or
         * we see its tail here. */
        n = __atomic_load_n(notify, __ATOMIC_ACQUIRE);
        __atomic_fetch_add(waiters, 1u, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(tail, __ATOMIC_SEQ_CST) == seen_tail &&
            __atomic_load_n(epoch, __ATOMIC_SEQ_CST) == r->epoch &&
            !__atomic_load_n(&r->interrupt, __ATOMIC_ACQUIRE))
            ovl__futex_wait(notify, n, max_ns);
        __atomic_fetch_sub(waiters, 1u, __ATOMIC_SEQ_CST);
    } else {
        /* Read-only: we cannot register, so the producer will not wake us
         * unless another reader is waiting. Poll at a bounded interval. */
        notify = ovl__u32(r->base, OVL_OFF_NOTIFY);
        n = __atomic_load_n(notify, __ATOMIC_ACQUIRE);
        if (__atomic_load_n(tail, __ATOMIC_ACQUIRE) == seen_tail)
            ovl__futex_wait(notify, n, max_ns < OVL_POLL_NS ? max_ns : OVL_POLL_NS);
    }
}

/* Returns the next event (SPEC 1.4). timeout_ms < 0 waits forever, 0 polls.
 * RECORD copies the body (record bytes after the 24-byte header) into buf.
 * LOST comes before the record that revealed the gap; that record is
 * returned by the following call. OVL_ERR_BUFSMALL leaves the record in
 * place and sets ev->length to the size needed. */
static inline int ovl_reader_next(ovl_reader *r, void *buf, size_t bufcap, ovl_event *ev,
                                  int timeout_ms)
{
    ovl_event dummy;
    int64_t deadline, now;
    int laps = 0;
    if (!ev) ev = &dummy;
    memset(ev, 0, sizeof *ev);
    if (!r || !r->base) return ev->kind = OVL_ERR_CLOSED;
    if (!buf) bufcap = 0;
    now = ovl_now_ns();
    deadline = timeout_ms < 0 ? INT64_MAX : now + (int64_t)timeout_ms * 1000000ll;
    for (;;) {
        const uint64_t epoch = __atomic_load_n(ovl__u64(r->base, OVL_OFF_EPOCH), __ATOMIC_ACQUIRE);
        uint64_t tail;
        int rc;
        if (epoch != r->epoch) {
            if (epoch) return ovl__epoch_event(r, epoch, ev);
            /* 0: the producer is re-initialising in place; the new epoch follows shortly */
            now = ovl_now_ns();
            if (now >= deadline || __atomic_load_n(&r->interrupt, __ATOMIC_ACQUIRE))
                return ev->kind = OVL_EV_TIMEOUT;
            ovl__sleep_ns(deadline - now < 1000000ll ? deadline - now : 1000000ll);
            continue;
        }
        tail = ovl_reader_tail(r);
        if ((int64_t)(tail - r->cursor) > 0) {
            rc = ovl__read_one(r, buf, bufcap, ev, &laps);
            if (rc != OVL__AGAIN) return rc;
            continue;
        }
        if ((int64_t)(tail - r->cursor) < 0) {
            /* tail behind us: a re-init under way (the epoch tells) or a bad ring */
            if (__atomic_load_n(ovl__u64(r->base, OVL_OFF_EPOCH), __ATOMIC_ACQUIRE) != r->epoch)
                continue;
            r->cursor = tail;
            ovl__publish_cursor(r);
            return ev->kind = OVL_ERR_CORRUPT;
        }
        now = ovl_now_ns();
        rc = ovl__idle_checks(r, ev, now);
        if (rc) return rc;
        if (now >= deadline || __atomic_load_n(&r->interrupt, __ATOMIC_ACQUIRE))
            return ev->kind = OVL_EV_TIMEOUT;
        ovl__wait(r, tail, deadline - now < OVL_SLICE_NS ? deadline - now : OVL_SLICE_NS);
    }
}

/* ------------------------------------------------------------------------ */
/* STEP bodies (SPEC 1.3)                                                    */
/* ------------------------------------------------------------------------ */

typedef struct ovl_step {
    int32_t step_id;            /* >= 1; negative on a producer's last record */
    uint32_t flag;              /* 1 normal, 2 speculative */
    uint32_t k;                 /* top-k candidates per token (0 = none) */
    uint32_t T;                 /* token columns per row */
    uint32_t bsz;               /* rows */
    const int32_t *accept_num;  /* [bsz], each 0..T (spec: 1..T) */
    const uint64_t *request_id; /* [bsz] */
    const int32_t *finish;      /* [bsz] */
    const int32_t *tokens;      /* [bsz][T][k+1]; use ovl_step_token() */
    const float *logprobs;      /* [bsz][T][k+1] or NULL when k == 0 */
    const int32_t *ranks;       /* [bsz][T] or NULL when k == 0 */
} ovl_step;

/* Bytes a STEP body with these dimensions occupies (a multiple of 8), or 0
 * when T or k do not fit their 8-bit fields. */
static inline uint64_t ovl_step_body_size(uint32_t bsz, uint32_t T, uint32_t k)
{
    const uint64_t b = bsz, cells = b * T * ((uint64_t)k + 1);
    uint64_t n;
    if (T > 255 || k > 255) return 0;
    n = ovl_align8(4 * (3 + b)); /* meta, padded to 8 */
    n += 8 * b;                  /* request_id */
    n += 4 * b;                  /* finish */
    n += 4 * cells;              /* tokens */
    if (k) n += 4 * cells + 4 * b * T; /* logprobs, ranks */
    return ovl_align8(n);
}

/* Fills s with pointers into body (which must stay alive and be 8-byte
 * aligned). Returns 0, or OVL_ERR_* when the body cannot be read safely:
 * every array is checked against len before any pointer is handed out. */
static inline int ovl_step_parse(const void *body, size_t len, ovl_step *s)
{
    const uint8_t *p = (const uint8_t *)body;
    const int32_t *meta = (const int32_t *)body;
    uint32_t m1, i;
    int32_t bsz;
    uint64_t cells, off;
    if (!s) return OVL_ERR_INVAL;
    memset(s, 0, sizeof *s);
    if (!body) return OVL_ERR_INVAL;
    if ((uintptr_t)body & 7u) return OVL_ERR_ALIGN;
    if (len < 12) return OVL_ERR_TRUNCATED;
    bsz = meta[2];
    if (bsz < 0) return OVL_ERR_FORMAT;
    m1 = (uint32_t)meta[1];
    s->step_id = meta[0];
    s->flag = m1 & 0xFFu;
    s->k = (m1 >> 8) & 0xFFu;
    s->T = (m1 >> 16) & 0xFFu;
    s->bsz = (uint32_t)bsz;
    if (ovl_step_body_size(s->bsz, s->T, s->k) > len) return OVL_ERR_TRUNCATED;
    cells = (uint64_t)s->bsz * s->T * (s->k + 1);
    s->accept_num = meta + 3;
    off = ovl_align8(4 * (3 + (uint64_t)s->bsz));
    s->request_id = (const uint64_t *)(const void *)(p + off);
    off += 8 * (uint64_t)s->bsz;
    s->finish = (const int32_t *)(const void *)(p + off);
    off += 4 * (uint64_t)s->bsz;
    s->tokens = (const int32_t *)(const void *)(p + off);
    off += 4 * cells;
    if (s->k) {
        s->logprobs = (const float *)(const void *)(p + off);
        off += 4 * cells;
        s->ranks = (const int32_t *)(const void *)(p + off);
    }
    for (i = 0; i < s->bsz; i++)
        if (s->accept_num[i] < 0 || (uint32_t)s->accept_num[i] > s->T) return OVL_ERR_FORMAT;
    return 0;
}

/* tokens[row][col][j]: j = 0 is the emitted token, 1..k the candidates. */
static inline int32_t ovl_step_token(const ovl_step *s, uint32_t row, uint32_t col, uint32_t j)
{
    return s->tokens[((uint64_t)row * s->T + col) * (s->k + 1) + j];
}

static inline float ovl_step_logprob(const ovl_step *s, uint32_t row, uint32_t col, uint32_t j)
{
    return s->logprobs[((uint64_t)row * s->T + col) * (s->k + 1) + j];
}

static inline int32_t ovl_step_rank(const ovl_step *s, uint32_t row, uint32_t col)
{
    return s->ranks[(uint64_t)row * s->T + col];
}

#ifdef __cplusplus
}
#endif

#endif /* OVERLAPD_RING_H */
