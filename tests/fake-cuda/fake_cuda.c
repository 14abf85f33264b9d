/*
 * A test double of the CUDA driver library (libcuda.so.1) for machines without a GPU.
 *
 * It implements exactly the driver calls llumlet-rs makes (dataplane/src/cuda.rs lists them),
 * with the semantics the code relies on, so the whole GPU path (an engine exporting its KV
 * cache as IPC handles, a llumlet opening both engines' handles and copying runs device to
 * device) runs in CI across real processes:
 *
 * - "Device memory" is a memfd mapped in the allocating process. Device addresses live in their
 *   own range and are translated through a table, so they cannot be dereferenced on the host
 *   by mistake (that faults, as on a GPU), and every copy is checked to lie inside one
 *   allocation or opened mapping (CUDA_ERROR_INVALID_VALUE otherwise).
 * - An IPC handle names the exporter's pid and memfd; another process opens it through
 *   /proc/<pid>/fd, so the exporter must still be alive, as with CUDA. Opening a handle in the
 *   process that exported it is refused, as CUDA refuses it; opening one twice returns the same
 *   address with a reference count.
 * - Memory calls need a current context on the calling thread (cuCtxSetCurrent), as CUDA does.
 * - A host-to-device copy may return before its bytes land, as CUDA allows for pageable host
 *   memory: here they land only at the process's next synchronizing call (cuCtxSynchronize,
 *   cuEventSynchronize, cuMemcpyDtoH, cuMemFree), so another process reading the memory before
 *   the writer synchronized sees the old bytes. Device-to-device copies complete before they
 *   return; events and streams are bookkeeping.
 *
 * It is never a GPU: llumlet reports it as "the test double libcuda" (it exports
 * `llumlet_fake_cuda`), and no figure measured over it is a GPU figure.
 *
 * Knobs (environment, read at cuInit):
 *   LLUMLET_FAKE_CUDA_DEVICES=N        devices reported (default 1; 0 = none)
 *   LLUMLET_FAKE_CUDA_FAIL_COPY_AFTER=N  every device-to-device copy after the first N fails
 *                                       with CUDA_ERROR_LAUNCH_FAILED (fault tests)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void *CUcontext;
typedef void *CUstream;
typedef void *CUevent;
typedef struct {
    char reserved[64];
} CUipcMemHandle;

enum {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_INITIALIZED = 3,
    NO_DEVICE = 100,
    INVALID_DEVICE = 101,
    INVALID_CONTEXT = 201,
    MAP_FAILED_ = 205,
    OPERATING_SYSTEM = 304,
    INVALID_HANDLE = 400,
    LAUNCH_FAILED = 719,
};

#define MAGIC "LLFKCUDA"
#define DEVICE_BASE 0x00c0000000000000ULL
#define SLOT_SPAN (1ULL << 40) /* device address space per allocation */
#define MAX_ENTRIES 4096

struct handle {
    char magic[8];
    uint32_t pid;
    int32_t fd;
    uint64_t id;
    uint64_t len;
    char pad[64 - 8 - 4 - 4 - 8 - 8];
};

struct entry {
    int used;
    int exported_here; /* 1: cuMemAlloc in this process; 0: an opened IPC mapping */
    uint64_t id;        /* allocation id in its exporting process */
    uint32_t pid;       /* exporting process */
    int fd;
    uint64_t len;
    void *host;
    CUdeviceptr dev;
    int refs;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct entry table[MAX_ENTRIES];
static uint64_t next_id = 1;
static int initialised;
static int devices = 1;
static long fail_copy_after = -1;
static long copies;
static int primary_refs;
static int primary_ctx_storage;
static __thread CUcontext current;

/* Host-to-device copies not landed yet (see above), oldest first; the lock is held. */
struct pending {
    void *dst;
    void *data;
    size_t n;
    struct pending *next;
};
static struct pending *pending_head, *pending_tail;

static void land_pending(void) {
    while (pending_head) {
        struct pending *p = pending_head;
        memcpy(p->dst, p->data, p->n);
        pending_head = p->next;
        free(p->data);
        free(p);
    }
    pending_tail = NULL;
}

int llumlet_fake_cuda(void) { return 1; }

/* primary_refs, devices and initialised are read without the lock: atomics. */
static int ndev(void) { return __atomic_load_n(&devices, __ATOMIC_SEQ_CST); }
static int inited(void) { return __atomic_load_n(&initialised, __ATOMIC_SEQ_CST); }

static int ctx_ok(void) {
    return current == &primary_ctx_storage && __atomic_load_n(&primary_refs, __ATOMIC_SEQ_CST) > 0;
}

CUresult cuInit(unsigned int flags) {
    if (flags != 0)
        return INVALID_VALUE;
    const char *d = getenv("LLUMLET_FAKE_CUDA_DEVICES");
    const char *f = getenv("LLUMLET_FAKE_CUDA_FAIL_COPY_AFTER");
    pthread_mutex_lock(&lock);
    __atomic_store_n(&devices, d ? atoi(d) : 1, __ATOMIC_SEQ_CST);
    fail_copy_after = f ? atol(f) : -1;
    __atomic_store_n(&initialised, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

CUresult cuDriverGetVersion(int *v) {
    if (!v)
        return INVALID_VALUE;
    *v = 12040;
    return SUCCESS;
}

CUresult cuDeviceGetCount(int *n) {
    if (!inited())
        return NOT_INITIALIZED;
    if (!n)
        return INVALID_VALUE;
    *n = ndev();
    return SUCCESS;
}

CUresult cuDeviceGet(CUdevice *dev, int ordinal) {
    if (!inited())
        return NOT_INITIALIZED;
    if (ndev() == 0)
        return NO_DEVICE;
    if (!dev || ordinal < 0 || ordinal >= ndev())
        return INVALID_DEVICE;
    *dev = ordinal;
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice dev) {
    if (!inited())
        return NOT_INITIALIZED;
    if (!ctx || dev < 0 || dev >= ndev())
        return INVALID_DEVICE;
    pthread_mutex_lock(&lock);
    __atomic_add_fetch(&primary_refs, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&lock);
    *ctx = &primary_ctx_storage;
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    if (dev < 0 || dev >= ndev())
        return INVALID_DEVICE;
    pthread_mutex_lock(&lock);
    int refs = __atomic_load_n(&primary_refs, __ATOMIC_SEQ_CST);
    CUresult r = refs > 0 ? SUCCESS : INVALID_CONTEXT;
    if (refs > 0)
        __atomic_sub_fetch(&primary_refs, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&lock);
    return r;
}

CUresult cuCtxSetCurrent(CUcontext ctx) {
    if (ctx && ctx != &primary_ctx_storage)
        return INVALID_CONTEXT;
    current = ctx;
    return SUCCESS;
}

CUresult cuCtxSynchronize(void) {
    if (!ctx_ok())
        return INVALID_CONTEXT;
    pthread_mutex_lock(&lock);
    land_pending();
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

CUresult cuStreamCreate(CUstream *s, unsigned int flags) {
    (void)flags;
    if (!ctx_ok())
        return INVALID_CONTEXT;
    if (!s)
        return INVALID_VALUE;
    *s = malloc(1);
    return *s ? SUCCESS : OUT_OF_MEMORY;
}

CUresult cuStreamDestroy_v2(CUstream s) {
    free(s);
    return SUCCESS;
}

CUresult cuEventCreate(CUevent *e, unsigned int flags) {
    (void)flags;
    if (!ctx_ok())
        return INVALID_CONTEXT;
    if (!e)
        return INVALID_VALUE;
    *e = malloc(1);
    return *e ? SUCCESS : OUT_OF_MEMORY;
}

CUresult cuEventDestroy_v2(CUevent e) {
    free(e);
    return SUCCESS;
}

CUresult cuEventRecord(CUevent e, CUstream s) {
    (void)s;
    if (!ctx_ok())
        return INVALID_CONTEXT;
    return e ? SUCCESS : INVALID_HANDLE;
}

CUresult cuEventSynchronize(CUevent e) {
    if (!ctx_ok())
        return INVALID_CONTEXT;
    pthread_mutex_lock(&lock);
    land_pending();
    pthread_mutex_unlock(&lock);
    return e ? SUCCESS : INVALID_HANDLE;
}

/* A free table slot and its device base; the lock is held. */
static struct entry *new_entry(void) {
    for (int i = 0; i < MAX_ENTRIES; i++) {
        if (!table[i].used) {
            memset(&table[i], 0, sizeof table[i]);
            table[i].used = 1;
            table[i].dev = DEVICE_BASE + (CUdeviceptr)i * SLOT_SPAN;
            return &table[i];
        }
    }
    return NULL;
}

/* The host address of [dev, dev+n) if it lies inside one entry; the lock is held. */
static void *translate(CUdeviceptr dev, size_t n) {
    if (dev < DEVICE_BASE)
        return NULL;
    uint64_t i = (dev - DEVICE_BASE) / SLOT_SPAN;
    if (i >= MAX_ENTRIES || !table[i].used)
        return NULL;
    uint64_t off = dev - table[i].dev;
    if (off > table[i].len || n > table[i].len - off)
        return NULL;
    return (char *)table[i].host + off;
}

static struct entry *entry_at(CUdeviceptr dev) {
    if (dev < DEVICE_BASE)
        return NULL;
    uint64_t i = (dev - DEVICE_BASE) / SLOT_SPAN;
    if (i >= MAX_ENTRIES || !table[i].used || table[i].dev != dev)
        return NULL;
    return &table[i];
}

CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytes) {
    if (!ctx_ok())
        return INVALID_CONTEXT;
    if (!dptr || bytes == 0 || bytes > SLOT_SPAN)
        return INVALID_VALUE;
    int fd = (int)syscall(SYS_memfd_create, "llumlet-fake-cuda", 1 /* MFD_CLOEXEC */);
    if (fd < 0)
        return OPERATING_SYSTEM;
    if (ftruncate(fd, (off_t)bytes) != 0) {
        close(fd);
        return OUT_OF_MEMORY;
    }
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        close(fd);
        return OUT_OF_MEMORY;
    }
    /* Device memory is not zeroed by cuMemAlloc: make that visible. */
    memset(p, 0xA5, bytes);
    pthread_mutex_lock(&lock);
    struct entry *e = new_entry();
    if (!e) {
        pthread_mutex_unlock(&lock);
        munmap(p, bytes);
        close(fd);
        return OUT_OF_MEMORY;
    }
    e->exported_here = 1;
    e->id = next_id++;
    e->pid = (uint32_t)getpid();
    e->fd = fd;
    e->len = bytes;
    e->host = p;
    e->refs = 1;
    *dptr = e->dev;
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

CUresult cuMemFree_v2(CUdeviceptr dptr) {
    if (!ctx_ok())
        return INVALID_CONTEXT;
    pthread_mutex_lock(&lock);
    land_pending();
    struct entry *e = entry_at(dptr);
    if (!e || !e->exported_here) {
        pthread_mutex_unlock(&lock);
        return INVALID_VALUE;
    }
    munmap(e->host, e->len);
    close(e->fd);
    e->used = 0;
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

CUresult cuIpcGetMemHandle(CUipcMemHandle *h, CUdeviceptr dptr) {
    if (!ctx_ok())
        return INVALID_CONTEXT;
    if (!h)
        return INVALID_VALUE;
    pthread_mutex_lock(&lock);
    struct entry *e = entry_at(dptr);
    if (!e || !e->exported_here) {
        pthread_mutex_unlock(&lock);
        return INVALID_VALUE;
    }
    struct handle out;
    memset(&out, 0, sizeof out);
    memcpy(out.magic, MAGIC, 8);
    out.pid = e->pid;
    out.fd = e->fd;
    out.id = e->id;
    out.len = e->len;
    pthread_mutex_unlock(&lock);
    memcpy(h->reserved, &out, sizeof out);
    return SUCCESS;
}

CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *dptr, CUipcMemHandle h, unsigned int flags) {
    (void)flags;
    if (!ctx_ok())
        return INVALID_CONTEXT;
    if (!dptr)
        return INVALID_VALUE;
    struct handle in;
    memcpy(&in, h.reserved, sizeof in);
    if (memcmp(in.magic, MAGIC, 8) != 0 || in.len == 0 || in.len > SLOT_SPAN)
        return INVALID_HANDLE;
    if (in.pid == (uint32_t)getpid())
        return INVALID_CONTEXT; /* CUDA refuses to open a handle in its exporting process */
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_ENTRIES; i++) {
        struct entry *e = &table[i];
        if (e->used && !e->exported_here && e->pid == in.pid && e->id == in.id) {
            e->refs++;
            *dptr = e->dev;
            pthread_mutex_unlock(&lock);
            return SUCCESS;
        }
    }
    pthread_mutex_unlock(&lock);
    char path[64];
    snprintf(path, sizeof path, "/proc/%u/fd/%d", in.pid, in.fd);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return INVALID_HANDLE; /* the exporter is gone */
    off_t size = lseek(fd, 0, SEEK_END);
    if (size < 0 || (uint64_t)size != in.len) {
        close(fd);
        return INVALID_HANDLE; /* that fd is now something else */
    }
    void *p = mmap(NULL, in.len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED)
        return MAP_FAILED_;
    pthread_mutex_lock(&lock);
    struct entry *e = new_entry();
    if (!e) {
        pthread_mutex_unlock(&lock);
        munmap(p, in.len);
        return OUT_OF_MEMORY;
    }
    e->exported_here = 0;
    e->id = in.id;
    e->pid = in.pid;
    e->fd = -1;
    e->len = in.len;
    e->host = p;
    e->refs = 1;
    *dptr = e->dev;
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

CUresult cuIpcCloseMemHandle(CUdeviceptr dptr) {
    if (!ctx_ok())
        return INVALID_CONTEXT;
    pthread_mutex_lock(&lock);
    struct entry *e = entry_at(dptr);
    if (!e || e->exported_here) {
        pthread_mutex_unlock(&lock);
        return INVALID_VALUE;
    }
    if (--e->refs == 0) {
        munmap(e->host, e->len);
        e->used = 0;
    }
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

static CUresult copy(void *dst, const void *src, size_t n) {
    if (!dst || !src)
        return INVALID_VALUE;
    memmove(dst, src, n);
    return SUCCESS;
}

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    if (!ctx_ok())
        return INVALID_CONTEXT;
    if (!s)
        return INVALID_HANDLE;
    pthread_mutex_lock(&lock);
    if (fail_copy_after >= 0 && copies >= fail_copy_after) {
        pthread_mutex_unlock(&lock);
        return LAUNCH_FAILED;
    }
    copies++;
    void *d = translate(dst, n), *sp = translate(src, n);
    pthread_mutex_unlock(&lock);
    return copy(d, sp, n);
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
    if (!ctx_ok())
        return INVALID_CONTEXT;
    if (!src)
        return INVALID_VALUE;
    pthread_mutex_lock(&lock);
    void *d = translate(dst, n);
    if (!d) {
        pthread_mutex_unlock(&lock);
        return INVALID_VALUE;
    }
    struct pending *p = malloc(sizeof *p);
    void *data = malloc(n ? n : 1);
    if (!p || !data) {
        free(p);
        free(data);
        pthread_mutex_unlock(&lock);
        return OUT_OF_MEMORY;
    }
    memcpy(data, src, n);
    *p = (struct pending){.dst = d, .data = data, .n = n, .next = NULL};
    if (pending_tail)
        pending_tail->next = p;
    else
        pending_head = p;
    pending_tail = p;
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
    if (!ctx_ok())
        return INVALID_CONTEXT;
    pthread_mutex_lock(&lock);
    land_pending();
    void *s = translate(src, n);
    pthread_mutex_unlock(&lock);
    return copy(dst, s, n);
}

CUresult cuGetErrorString(CUresult r, const char **s) {
    if (!s)
        return INVALID_VALUE;
    switch (r) {
    case SUCCESS: *s = "no error"; break;
    case INVALID_VALUE: *s = "invalid argument"; break;
    case OUT_OF_MEMORY: *s = "out of memory"; break;
    case NOT_INITIALIZED: *s = "initialization error"; break;
    case NO_DEVICE: *s = "no CUDA-capable device is detected"; break;
    case INVALID_DEVICE: *s = "invalid device ordinal"; break;
    case INVALID_CONTEXT: *s = "invalid device context"; break;
    case MAP_FAILED_: *s = "mapping of buffer object failed"; break;
    case OPERATING_SYSTEM: *s = "OS call failed or operation not supported on this OS"; break;
    case INVALID_HANDLE: *s = "invalid resource handle"; break;
    case LAUNCH_FAILED: *s = "unspecified launch failure"; break;
    default: *s = NULL; return INVALID_VALUE;
    }
    return SUCCESS;
}
