/* The virtio-blk request loop in C: a split virtqueue served straight from guest RAM.
 *
 * Why C: in Python one 4 KiB request costs ~50 us of interpreter time, more than
 * QEMU spends on the whole request; this loop does the ring walk, the checks, the
 * pread/pwrite or the copy from verified chunk memory, the used ring and the
 * interrupt decision without the interpreter. It mirrors, check for check,
 * Virtqueue.pop/_walk/add_used/wants_interrupt (stellarium_core.virtio.queue) and
 * VirtioStellar._serve/_request (device.py); tests/test_blkring_fuzz.py holds the
 * two to the same results on hostile rings.
 *
 * A request this loop does not perform (a write to a Stellarium volume, a flush of
 * one, discard, write-zeroes, a read of a slot whose chunk memory Python has not
 * published) is handed back: vb_drain returns VB_SLOW with the chain's head, Python
 * serves it and calls vb_complete. Nothing here allocates; every guest address is
 * checked against the regions before it is touched.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define VB_MAX_REGIONS 8
#define VB_MAX_QUEUE 32768
#define VB_IOV 1024                  /* iovecs per preadv/pwritev call (IOV_MAX) */
#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1
#define MAX_BUFFER (1u << 30)
#define SECTOR 512u
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13
#define S_OK 0
#define S_IOERR 1
#define S_UNSUPP 2
#define ID_BYTES 20

enum { VB_EMPTY = 0, VB_SLOW = 1, VB_BROKEN = 2 };

struct vb_region { uint64_t gpa, size; uint8_t *host; };
struct seg { uint8_t *p; uint64_t len; };

struct vb_dev {
    struct vb_region regions[VB_MAX_REGIONS];
    int nregions;
    uint32_t qsize;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint16_t last_avail, used_idx, signalled_used;
    int event_idx;
    int fd;                         /* raw file; -1: reads from slots[], the rest is Python's */
    uint64_t sectors;
    int readonly;
    uint32_t shift;                 /* slot = byte offset >> shift */
    uint64_t nslots;
    const uint8_t **slots;          /* NULL: not published (ask Python) */
    uint8_t serial[ID_BYTES];
    uint32_t serial_len;
    uint64_t max_request;
    uint32_t *seen;                 /* qsize stamps: loop detection */
    uint32_t stamp;
    struct seg *seg;                /* qsize entries: the chain being served */
    int nseg, writable_from;
    struct iovec iov[VB_IOV];
    uint16_t slow_head;
    uint32_t used_since_signal;
    char error[160];
    uint64_t served, slowed;
    /* what the device's metrics() reports for requests C completed (served() counts) */
    uint64_t requests, errors, read_bytes, write_bytes, latency_ns, latency_ns_max;
};

/* -- guest memory ------------------------------------------------------------ */

static uint8_t *gm(struct vb_dev *d, uint64_t addr, uint64_t len)
{
    for (int i = 0; i < d->nregions; i++) {
        struct vb_region *r = &d->regions[i];
        if (addr >= r->gpa && addr - r->gpa <= r->size && len <= r->size - (addr - r->gpa))
            return r->host + (addr - r->gpa);
    }
    return NULL;
}

static uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static void st16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* -- chains ------------------------------------------------------------------ */

static int fail(struct vb_dev *d, const char *msg, unsigned a, unsigned b)
{
    char num[24];
    int k = 0;
    const char *s = msg;
    while (*s && k < (int)sizeof(d->error) - 1) {
        if (*s == '%' && (s[1] == 'a' || s[1] == 'b')) {
            unsigned v = s[1] == 'a' ? a : b;
            int m = 0;
            do { num[m++] = (char)('0' + v % 10); v /= 10; } while (v && m < 23);
            while (m && k < (int)sizeof(d->error) - 1) d->error[k++] = num[--m];
            s += 2;
            continue;
        }
        d->error[k++] = *s++;
    }
    d->error[k] = 0;
    return -1;
}

/* Virtqueue._walk: the same checks, in the same order, into d->seg. */
static int walk(struct vb_dev *d, uint16_t head)
{
    uint8_t *table = gm(d, d->desc_gpa, 16ull * d->qsize);
    uint32_t index = head;
    if (!table)
        return fail(d, "descriptor table is outside guest memory", 0, 0);
    if (++d->stamp == 0) {
        memset(d->seen, 0, sizeof(uint32_t) * d->qsize);
        d->stamp = 1;
    }
    int n = 0, writable_from = -1;
    for (;;) {
        if (index >= d->qsize)
            return fail(d, "descriptor index %a is outside the queue (size %b)", index, d->qsize);
        if (d->seen[index] == d->stamp)
            return fail(d, "descriptor chain from %a loops back to %b", head, index);
        d->seen[index] = d->stamp;
        const uint8_t *e = table + 16u * index;
        uint64_t addr; uint32_t len; uint16_t flags, next;
        memcpy(&addr, e, 8); memcpy(&len, e + 8, 4); memcpy(&flags, e + 12, 2);
        memcpy(&next, e + 14, 2);
        if (flags & F_INDIRECT)
            return fail(d, "descriptor %a: indirect descriptors were not negotiated", index, 0);
        uint8_t *p = NULL;
        if (len) {
            if (len > MAX_BUFFER)
                return fail(d, "descriptor %a buffer is larger than 1 GiB", index, 0);
            p = gm(d, addr, len);
            if (!p)
                return fail(d, "descriptor %a buffer is outside guest memory", index, 0);
        }
        if (flags & F_WRITE) {
            if (writable_from < 0)
                writable_from = n;
        } else if (writable_from >= 0) {
            return fail(d, "descriptor %a: readable buffer after a writable one", index, 0);
        }
        d->seg[n].p = p;           /* n < qsize: each index is visited at most once */
        d->seg[n].len = len;
        n++;
        if (!(flags & F_NEXT))
            break;
        index = next;
    }
    d->nseg = n;
    d->writable_from = writable_from < 0 ? n : writable_from;
    return 0;
}

/* -- a cursor over a run of segments (Reader / Writer) ----------------------- */

struct cur { struct seg *s; int n, i; uint64_t off, left; };

static void cur_init(struct cur *k, struct seg *s, int n)
{
    k->s = s; k->n = n; k->i = 0; k->off = 0; k->left = 0;
    for (int j = 0; j < n; j++) k->left += s[j].len;
}

/* Copy len bytes out of (to_guest=0) or into (to_guest=1) the chain at the cursor. */
static void cur_copy(struct cur *k, uint8_t *buf, uint64_t len, int to_guest)
{
    k->left -= len;
    while (len) {
        struct seg *s = &k->s[k->i];
        uint64_t take = s->len - k->off;
        if (take > len) take = len;
        if (take) {
            if (to_guest) memcpy(s->p + k->off, buf, take);
            else memcpy(buf, s->p + k->off, take);
        }
        buf += take; len -= take; k->off += take;
        if (k->off == s->len) { k->i++; k->off = 0; }
    }
}

static int io_full(int fd, struct iovec *iov, int n, uint64_t off, int write)
{
    while (n) {
        ssize_t r = write ? pwritev(fd, iov, n, (off_t)off) : preadv(fd, iov, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) return -1;           /* the file ended early (or a full disk) */
        off += (uint64_t)r;
        while (n && (uint64_t)r >= iov->iov_len) { r -= (ssize_t)iov->iov_len; iov++; n--; }
        if (n) { iov->iov_base = (uint8_t *)iov->iov_base + r; iov->iov_len -= (size_t)r; }
    }
    return 0;
}

/* Read (write=0) or write the file at off into / from the next len bytes at the
 * cursor, up to VB_IOV buffers per call. */
static int cur_io(struct vb_dev *d, struct cur *k, uint64_t len, uint64_t off, int write)
{
    while (len) {
        int n = 0;
        uint64_t batch = 0;
        while (len && n < VB_IOV) {
            struct seg *s = &k->s[k->i];
            uint64_t take = s->len - k->off;
            if (take > len) take = len;
            if (take) {
                d->iov[n].iov_base = s->p + k->off;
                d->iov[n].iov_len = take;
                n++;
            }
            len -= take; batch += take; k->off += take; k->left -= take;
            if (k->off == s->len) { k->i++; k->off = 0; }
        }
        if (io_full(d->fd, d->iov, n, off, write))
            return -1;
        off += batch;
    }
    return 0;
}

/* -- one request (VirtioStellar._serve / _request) ----------------------------- */

#define VB_SLOW_REQUEST (-2)
#define SLOW VB_SLOW_REQUEST

static int in_range(struct vb_dev *d, uint64_t sector, uint64_t count)
{
    return sector <= d->sectors && count <= d->sectors - sector;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Returns the bytes written into the chain (status included), or SLOW. */
static long long serve(struct vb_dev *d)
{
    uint64_t started = now_ns();
    struct seg *seg = d->seg;
    int wfrom = d->writable_from;
    /* split_tail(1): the status byte is the last byte of the writable buffers */
    int last = d->nseg - 1;
    while (last >= wfrom && seg[last].len == 0) last--;
    if (last < wfrom)
        return 0;                                    /* nowhere to put a status: drop it */
    uint8_t *status = seg[last].p + seg[last].len - 1;
    uint64_t saved = seg[last].len;
    seg[last].len -= 1;

    struct cur rd, wr;
    cur_init(&rd, seg, wfrom);
    cur_init(&wr, seg + wfrom, last + 1 - wfrom);
    uint64_t r_len = rd.left, w_len = wr.left, written = 0;
    int st = S_OK;
    uint8_t hdr[16];

    uint32_t type = 0;
    uint64_t sector = 0, payload = 0;
    if (r_len < 16) { st = S_IOERR; goto done; }
    cur_copy(&rd, hdr, 16, 0);
    memcpy(&type, hdr, 4); memcpy(&sector, hdr + 8, 8);
    payload = r_len - 16;
    switch (type) {
    case T_IN: {
        if (payload || w_len % SECTOR || w_len > d->max_request) { st = S_IOERR; break; }
        if (!in_range(d, sector, w_len / SECTOR)) { st = S_IOERR; break; }
        if (d->fd >= 0) {
            if (cur_io(d, &wr, w_len, sector * SECTOR, 0)) { st = S_IOERR; break; }
        } else {
            uint64_t pos = sector * SECTOR, end = pos + w_len, size = 1ull << d->shift;
            for (uint64_t p = pos; p < end; p = (p | (size - 1)) + 1)
                if (d->slots[p >> d->shift] == NULL) { seg[last].len = saved; return SLOW; }
            while (pos < end) {
                uint64_t idx = pos >> d->shift, in = pos & (size - 1), n = size - in;
                if (n > end - pos) n = end - pos;
                cur_copy(&wr, (uint8_t *)d->slots[idx] + in, n, 1);
                pos += n;
            }
        }
        written = w_len;
        break;
    }
    case T_OUT: {
        if (w_len || payload % SECTOR || payload > d->max_request || d->readonly) {
            st = S_IOERR; break;
        }
        if (!in_range(d, sector, payload / SECTOR)) { st = S_IOERR; break; }
        if (d->fd < 0) { seg[last].len = saved; return SLOW; }
        if (cur_io(d, &rd, payload, sector * SECTOR, 1)) st = S_IOERR;
        break;
    }
    case T_FLUSH:
        if (!d->readonly) {
            if (d->fd < 0) { seg[last].len = saved; return SLOW; }
            if (fdatasync(d->fd)) st = S_IOERR;
        }
        break;
    case T_GET_ID: {
        uint64_t n = w_len < ID_BYTES ? w_len : ID_BYTES;
        uint8_t id[ID_BYTES] = {0};
        memcpy(id, d->serial, d->serial_len < n ? d->serial_len : n);
        cur_copy(&wr, id, n, 1);
        written = n;
        break;
    }
    case T_DISCARD:
    case T_WRITE_ZEROES:
        if (!d->readonly) { seg[last].len = saved; return SLOW; }
        st = S_UNSUPP;
        break;
    default:
        st = S_UNSUPP;
    }
done:
    if (st != S_OK) written = 0;
    seg[last].len = saved;
    *status = (uint8_t)st;
    uint64_t took = now_ns() - started;
    d->requests++;
    d->errors += st != S_OK;
    if (st == S_OK && type == T_IN) d->read_bytes += written;
    if (st == S_OK && type == T_OUT) d->write_bytes += payload;
    d->latency_ns += took;
    if (took > d->latency_ns_max) d->latency_ns_max = took;
    return (long long)written + 1;
}

/* -- the ring (Virtqueue.pop / add_used / wants_interrupt) ----------------------- */

static void add_used(struct vb_dev *d, uint8_t *used, uint16_t head, uint32_t written)
{
    uint32_t slot = d->used_idx & (d->qsize - 1);
    st32(used + 4 + 8 * slot, head);
    st32(used + 8 + 8 * slot, written);
    d->used_idx = (uint16_t)(d->used_idx + 1);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    st16(used + 2, d->used_idx);
    d->used_since_signal++;
}

/* Serve the chain at head again (after Python published the chunk memory it
 * lacked): the bytes written (status included), SLOW, or -1 with error set. */
long long vb_serve_one(struct vb_dev *d, uint16_t head)
{
    if (walk(d, head))
        return -1;
    return serve(d);
}

/* Complete the chain Python served after VB_SLOW. */
int vb_complete(struct vb_dev *d, uint16_t head, uint32_t written)
{
    uint8_t *used = gm(d, d->used_gpa, 6 + 8ull * d->qsize);
    if (!used)
        return fail(d, "used ring is outside guest memory", 0, 0);
    add_used(d, used, head, written);
    return 0;
}

/* Serve chains until the ring is empty (VB_EMPTY), one needs Python (VB_SLOW,
 * slow_head set, the chain popped but not completed) or the ring is hostile
 * (VB_BROKEN, error set). */
int vb_drain(struct vb_dev *d)
{
    uint8_t *avail = gm(d, d->avail_gpa, 6 + 2ull * d->qsize);
    uint8_t *used = gm(d, d->used_gpa, 6 + 8ull * d->qsize);
    if (!avail || !used) {
        fail(d, "the rings are outside guest memory", 0, 0);
        return VB_BROKEN;
    }
    for (;;) {
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        uint16_t pending = (uint16_t)(ld16(avail + 2) - d->last_avail);
        if (pending > d->qsize) {
            fail(d, "available index moved by %a, more than the queue size %b", pending,
                 d->qsize);
            return VB_BROKEN;
        }
        if (!pending) {
            if (!d->event_idx)
                return VB_EMPTY;
            st16(used + 4 + 8 * d->qsize, d->last_avail);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            pending = (uint16_t)(ld16(avail + 2) - d->last_avail);
            if (pending > d->qsize) {
                fail(d, "available index moved by %a, more than the queue size %b", pending,
                     d->qsize);
                return VB_BROKEN;
            }
            if (!pending)
                return VB_EMPTY;
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        uint16_t head = ld16(avail + 4 + 2 * (d->last_avail & (d->qsize - 1)));
        d->last_avail = (uint16_t)(d->last_avail + 1);
        if (walk(d, head))
            return VB_BROKEN;
        long long written = serve(d);
        if (written == SLOW) {
            d->slow_head = head;
            d->slowed++;
            return VB_SLOW;
        }
        add_used(d, used, head, (uint32_t)written);
        d->served++;
    }
}

/* Whether the driver wants an interrupt for what was used since the last call. */
int vb_wants_interrupt(struct vb_dev *d)
{
    uint8_t *avail = gm(d, d->avail_gpa, 6 + 2ull * d->qsize);
    if (!avail)
        return 1;
    d->used_since_signal = 0;
    if (!d->event_idx)
        return !(ld16(avail) & AVAIL_F_NO_INTERRUPT);
    uint16_t old = d->signalled_used, now = d->used_idx;
    d->signalled_used = now;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t event = ld16(avail + 4 + 2 * d->qsize);
    return (uint16_t)(now - event - 1) < (uint16_t)(now - old);
}
