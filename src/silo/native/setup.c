/*
 * silo-setup: builds a process-level (or app-level) sandbox from a setup script,
 * then execs silo-init (or the command).
 *
 *   silo-setup SYNC ERR IN OUT ERRFD INIT SCRIPT [--warm]
 *   silo-setup --trace SCRIPTFILE [dir=PATH | fail=PATH=ERRNO ...]
 *
 * The spawner clones a child into the sandbox's new namespaces; the child raises
 * all its capabilities into the ambient set (so they survive this exec whatever its
 * uid) and execs us at once, before its id maps exist. We then:
 *
 *  1. put IN, OUT, ERRFD on 0, 1, 2 and wait for "g" on SYNC: the parent has written
 *     the id maps and put us in our cgroup;
 *  2. become the namespace's root, unshare the cgroup namespace;
 *  3. execute the mount operations of the plan and pivot_root;
 *  4. drop the bounding set, switch to the sandbox user, set the other capability
 *     sets (ambient: only what --cap added), no_new_privs, parent-death signal, new
 *     session (and a pty from the sandbox's devpts with -t), rlimits, default signal
 *     dispositions (the mask stays full for silo-init);
 *  5. mark every fd but stdio close-on-exec, load the seccomp filter, exec silo-init
 *     from the sealed memfd INIT: "silo-init --run ERR -- ARGV..." resolves the command
 *     inside the new root (127 / 126 reported on ERR) and runs it; warm, "silo-init
 *     --wait ERR" is a parked sandbox.
 *
 * Failures go to ERR (a SOCK_SEQPACKET socket) as "error CLASS MESSAGE", CLASS being
 * a class of silo.model.errors; the spawner raises it. The script is written by
 * silo.backends.process.script (the one place that knows its layout): a sequence of
 * fields, each a 4-byte little-endian length, the bytes, and a NUL.
 *
 * --trace reads a script of operations from a file and prints the system calls they
 * would make instead of making them, one per line, fields separated by tabs, numbers
 * in decimal, "-" for NULL. fds are numbered from 101; "dir=PATH" makes PATH count as
 * a directory, "fail=PATH=ERRNO" makes the calls on PATH fail with ERRNO. It is the
 * recording fake the unit tests use, running this very code. The order of the steps above is the security argument; see
 * docs/design.md ("A process-level sandbox, step by step").
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <sched.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/openat2.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#include "fdpass.h"

#define MAGIC "silo-setup 4"
#define LAST_CAP 40
#define MAX_SCRIPT (16 << 20)

#define MAX_LAYERS 128

static int tracing;
static int err_fd = -1;
static int layer_fds[MAX_LAYERS]; /* idmapped lower layers from the spawner, in op order */
static int n_layers, next_layer;
static char **trace_args;
static int trace_fd = 100;

/* ---- reporting ---------------------------------------------------------- */

static void report(const char *cls, int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 3, 4)));
static void report(const char *cls, int code, const char *fmt, ...) {
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(msg, sizeof msg, "error %s ", cls);
    vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, ap);
    va_end(ap);
    if (err_fd >= 0) {
        if (write(err_fd, msg, strlen(msg)) < 0) {
            /* the spawner is gone: nobody to tell */
        }
    } else {
        fprintf(stderr, "silo-setup: %s\n", msg + 6);
    }
    _exit(code);
}

#define internal(...) report("InternalError", 125, __VA_ARGS__)
#define user_error(...) report("UserError", 125, __VA_ARGS__)

/* ---- the script --------------------------------------------------------- */

struct reader {
    char *p, *end;
};

static char *field(struct reader *r, size_t *len) {
    uint32_t n;
    if (r->end - r->p < 4)
        internal("malformed setup script (truncated)");
    memcpy(&n, r->p, 4); /* little endian: x86 and every other host silo runs on */
    if ((size_t)(r->end - r->p) < 4 + (size_t)n + 1 || r->p[4 + n] != '\0')
        internal("malformed setup script (field)");
    char *s = r->p + 4;
    r->p += 4 + (size_t)n + 1;
    if (len)
        *len = n;
    return s;
}

static char *str(struct reader *r) { return field(r, NULL); }

static long long num(struct reader *r) {
    char *s = field(r, NULL), *stop;
    errno = 0;
    long long v = strtoll(s, &stop, 10);
    if (errno || stop == s || *stop)
        internal("malformed setup script (number %s)", s);
    return v;
}

static char *read_all(int fd, size_t *len) {
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (!buf)
            internal("out of memory reading the setup script");
        if (n == cap) {
            if (cap >= MAX_SCRIPT)
                internal("setup script too large");
            cap *= 2;
            buf = realloc(buf, cap);
            continue;
        }
        ssize_t got = pread(fd, buf + n, cap - n, (off_t)n);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            internal("reading the setup script: %s", strerror(errno));
        if (got == 0)
            break;
        n += (size_t)got;
    }
    *len = n;
    return buf;
}

/* ---- system calls (printed instead of made with --trace) ---------------- */

static const char *nz(const char *s) { return s ? s : "-"; }

/* With --trace: the outcome of a call on PATH ("fail=PATH=ERRNO" arguments). */
static int traced(const char *path) {
    size_t len = strlen(path);
    for (char **a = trace_args; *a; a++)
        if (strncmp(*a, "fail=", 5) == 0 && strncmp(*a + 5, path, len) == 0 && (*a)[5 + len] == '=') {
            errno = atoi(*a + 6 + len);
            return -1;
        }
    return 0;
}

static int k_mount(const char *src, const char *dst, const char *fstype, unsigned long flags, const char *data) {
    if (tracing) {
        printf("mount\t%s\t%s\t%s\t%lu\t%s\n", nz(src), dst, nz(fstype), flags, nz(data));
        return traced(dst);
    }
    return mount(src, dst, fstype, flags, data);
}

static int k_umount(const char *dst, int flags) {
    if (tracing) {
        printf("umount\t%s\t%d\n", dst, flags);
        return traced(dst);
    }
    return umount2(dst, flags);
}

static int k_mkdir(const char *path, mode_t mode) {
    if (tracing) {
        printf("mkdir\t%s\t%u\n", path, mode);
        return traced(path);
    }
    if (mkdir(path, mode) < 0)
        return -1;
    return (mode & 07022) ? chmod(path, mode) : 0; /* the umask ate sticky/group/other-write */
}

static int k_chown(const char *path, long long uid, long long gid) {
    if (tracing) {
        printf("chown\t%s\t%lld\t%lld\n", path, uid, gid);
        return traced(path);
    }
    return lchown(path, (uid_t)uid, (gid_t)gid);
}

static int k_symlink(const char *target, const char *path) {
    if (tracing) {
        printf("symlink\t%s\t%s\n", target, path);
        return traced(path);
    }
    return symlink(target, path);
}

static int k_write_file(const char *path, const char *data, size_t len, mode_t mode) {
    if (tracing) {
        printf("write_file\t%s\t%zu\t%u\n", path, len, mode);
        return traced(path);
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, mode);
    if (fd < 0)
        return -1;
    while (len) {
        ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return close(fd);
}

static int openat2_in(int dirfd, const char *path, int flags) {
    struct open_how how = {.flags = (uint64_t)(flags | O_CLOEXEC),
                           .resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS};
    return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
}

/* O_PATH fd of ROOT/PATH resolved without leaving ROOT: symlinks met on the way
 * resolve as if ROOT were "/" (RESOLVE_IN_ROOT), so a hostile "/dst -> /" lands
 * inside the root (CVE-2021-30465). Missing components are created as directories,
 * the last one as CREATE ("dir" or "file"). */
static int k_open_in_root(const char *root, const char *path, const char *create) {
    if (tracing) {
        printf("open_in_root\t%s\t%s\t%s\t%d\n", root, path, create, ++trace_fd);
        return traced(path) < 0 ? -1 : trace_fd;
    }
    int root_fd = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root_fd < 0)
        return -1;
    char sub[PATH_MAX] = "";
    size_t sublen = 0;
    const char *p = path;
    int fd = -1;
    for (;;) {
        while (*p == '/')
            p++;
        if (!*p)
            break;
        const char *slash = strchr(p, '/');
        size_t n = slash ? (size_t)(slash - p) : strlen(p);
        if (n > NAME_MAX || sublen + n + 2 > sizeof sub) {
            close(root_fd);
            errno = ENAMETOOLONG;
            return -1;
        }
        char parent[PATH_MAX];
        memcpy(parent, sublen ? sub : ".", sublen ? sublen + 1 : 2);
        if (sublen)
            sub[sublen++] = '/';
        memcpy(sub + sublen, p, n);
        sublen += n;
        sub[sublen] = '\0';
        const char *rest = p + n;
        while (*rest == '/')
            rest++;
        int last = !*rest;
        if (fd >= 0)
            close(fd);
        fd = openat2_in(root_fd, sub, O_PATH);
        if (fd < 0 && errno == ENOENT) {
            int dir = openat2_in(root_fd, parent, O_PATH | O_DIRECTORY);
            if (dir < 0)
                break;
            char name[NAME_MAX + 1];
            snprintf(name, sizeof name, "%.*s", (int)n, p);
            int rc;
            if (last && strcmp(create, "file") == 0) {
                rc = openat(dir, name, O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW | O_CLOEXEC, 0644);
                if (rc >= 0)
                    close(rc);
            } else {
                rc = mkdirat(dir, name, 0755);
            }
            int e = errno;
            close(dir);
            if (rc < 0 && e != EEXIST) {
                errno = e;
                break;
            }
            fd = openat2_in(root_fd, sub, O_PATH);
        }
        if (fd < 0)
            break;
        p += n;
    }
    int e = errno;
    if (fd < 0 && !sublen && !*p) /* PATH names ROOT itself */
        fd = fcntl(root_fd, F_DUPFD_CLOEXEC, 0), e = errno;
    close(root_fd);
    errno = e;
    return fd;
}

static int k_open_path(const char *path) {
    if (tracing) {
        printf("open_path\t%s\t%d\n", path, ++trace_fd);
        return traced(path) < 0 ? -1 : trace_fd;
    }
    return open(path, O_PATH | O_CLOEXEC);
}

static void k_close(int fd) {
    if (tracing)
        printf("close\t%d\n", fd);
    else
        close(fd);
}

static int k_move_mount(int fd, const char *target) {
    if (tracing) {
        printf("move_mount\t%d\t%s\n", fd, target);
        return traced(target);
    }
    return (int)syscall(SYS_move_mount, fd, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH);
}

static int k_is_dir(const char *path) {
    if (tracing) {
        for (char **a = trace_args; *a; a++)
            if (strncmp(*a, "dir=", 4) == 0 && strcmp(*a + 4, path) == 0)
                return 1;
        return 0;
    }
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* Flags a remount inside a user namespace must keep: the kernel locks them. */
static unsigned long locked_flags(const char *path) {
    struct statvfs st;
    if (tracing || statvfs(path, &st) < 0)
        return 0;
    static const unsigned long map[][2] = {
        {ST_NOSUID, MS_NOSUID}, {ST_NODEV, MS_NODEV},         {ST_NOEXEC, MS_NOEXEC},
        {ST_NOATIME, MS_NOATIME}, {ST_NODIRATIME, MS_NODIRATIME}, {ST_RELATIME, MS_RELATIME}};
    unsigned long flags = 0;
    for (size_t i = 0; i < sizeof map / sizeof *map; i++)
        if (st.f_flag & map[i][0])
            flags |= map[i][1];
    return flags;
}

static int remount_readonly(const char *path) {
    return k_mount(NULL, path, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | locked_flags(path),
                   NULL);
}

static int k_pivot_root(const char *new_root) {
    if (tracing) {
        printf("pivot_root\t%s\n", new_root);
        return traced(new_root);
    }
    /* pivot_root(".", ".") then detach the old root: no put_old directory is left
     * inside the sandbox (the runc technique). */
    if (chdir(new_root) < 0 || syscall(SYS_pivot_root, ".", ".") < 0 || umount2(".", MNT_DETACH) < 0)
        return -1;
    return chdir("/");
}

static int k_sethostname(const char *name) {
    if (tracing) {
        printf("sethostname\t%s\n", name);
        return traced(name);
    }
    return sethostname(name, strlen(name));
}

static int k_loopback_up(void) {
    if (tracing) {
        printf("loopback_up\n");
        return 0;
    }
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -1;
    struct ifreq ifr = {0};
    strcpy(ifr.ifr_name, "lo");
    int rc = ioctl(s, SIOCGIFFLAGS, &ifr);
    if (rc == 0 && !(ifr.ifr_flags & IFF_UP)) { /* a pooled namespace is already up */
        ifr.ifr_flags = IFF_UP | IFF_RUNNING;
        rc = ioctl(s, SIOCSIFFLAGS, &ifr);
    }
    int e = errno;
    close(s);
    errno = e;
    return rc;
}

/* ---- the operations of silo.model.plan, one function each ---------------- */

static void escape_overlay(char *out, size_t size, const char *path) {
    size_t n = 0;
    for (; *path; path++) {
        if (n + 3 > size)
            internal("sandbox setup failed at overlay: layer path too long: %.64s...", path);
        if (*path == '\\' || *path == ':' || *path == ',')
            out[n++] = '\\';
        out[n++] = *path;
    }
    out[n] = '\0';
}

static char fdpath_buf[2][32];
static const char *fdpath(int which, int fd) {
    snprintf(fdpath_buf[which], sizeof fdpath_buf[which], "/proc/self/fd/%d", fd);
    return fdpath_buf[which];
}

#define OP_FAIL(what) internal("sandbox setup failed at %s: %s", what, strerror(errno))

static void run_op(struct reader *r) {
    const char *op = str(r);
    if (strcmp(op, "make-private") == 0) {
        /* SECURITY: no mount event crosses between the sandbox and the host (SECURITY.md #15). */
        if (k_mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
            OP_FAIL("make-private");
    } else if (strcmp(op, "tmpfs") == 0) {
        const char *target = str(r), *options = str(r);
        int ro = (int)num(r);
        if (k_mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | (ro ? MS_RDONLY : 0), options) < 0)
            internal("sandbox setup failed at tmpfs %s: %s", target, strerror(errno));
    } else if (strcmp(op, "mkdir") == 0) {
        const char *path = str(r);
        mode_t mode = (mode_t)num(r);
        long long uid = num(r), gid = num(r);
        if (k_mkdir(path, mode) < 0 || ((uid != -1 || gid != -1) && k_chown(path, uid, gid) < 0))
            internal("sandbox setup failed at mkdir %s: %s", path, strerror(errno));
    } else if (strcmp(op, "symlink") == 0) {
        const char *target = str(r), *path = str(r);
        if (k_symlink(target, path) < 0)
            internal("sandbox setup failed at symlink %s: %s", path, strerror(errno));
    } else if (strcmp(op, "write-file") == 0) {
        const char *path = str(r);
        size_t len;
        const char *data = field(r, &len);
        mode_t mode = (mode_t)num(r);
        if (k_write_file(path, data, len, mode) < 0)
            internal("sandbox setup failed at write-file %s: %s", path, strerror(errno));
    } else if (strcmp(op, "overlay") == 0) {
        const char *target = str(r);
        long long nlower = num(r);
        const char *lower[MAX_LAYERS];
        if (nlower < 1 || nlower > MAX_LAYERS)
            internal("malformed setup script (overlay layers)");
        for (long long i = 0; i < nlower; i++)
            lower[i] = str(r);
        const char *upper = str(r), *work = str(r);
        int userxattr = (int)num(r);
        long long nidmapped = num(r);
        if (nidmapped != 0 && nidmapped != nlower)
            internal("malformed setup script (overlay idmapped layers)");
        for (long long i = 0; i < nidmapped; i++) {
            /* the spawner's read-only clone of lower[i], idmapped into our user namespace;
             * an empty attach point: lower[i] is used as it is (a workspace's own layers,
             * already owned by the sandbox's ids) */
            const char *attach = str(r);
            if (!attach[0])
                continue;
            if (next_layer >= n_layers)
                internal("sandbox setup failed at overlay %s: the spawner sent too few idmapped layers", target);
            if (k_move_mount(layer_fds[next_layer++], attach) < 0)
                internal("sandbox setup failed at overlay %s (attaching %s): %s", target, lower[i], strerror(errno));
            lower[i] = attach;
        }
        static char data[65536];
        size_t n = (size_t)snprintf(data, sizeof data, "lowerdir=");
        char esc[PATH_MAX * 2];
        for (long long i = 0; i < nlower && n < sizeof data; i++) {
            escape_overlay(esc, sizeof esc, lower[i]);
            n += (size_t)snprintf(data + n, sizeof data - n, "%s%s", i ? ":" : "", esc);
        }
        escape_overlay(esc, sizeof esc, upper);
        if (n < sizeof data)
            n += (size_t)snprintf(data + n, sizeof data - n, ",upperdir=%s", esc);
        escape_overlay(esc, sizeof esc, work);
        if (n < sizeof data)
            n += (size_t)snprintf(data + n, sizeof data - n, ",workdir=%s", esc);
        if (userxattr && n < sizeof data)
            n += (size_t)snprintf(data + n, sizeof data - n, ",userxattr");
        if (n > 4095) /* the kernel reads one page of mount options */
            internal("sandbox setup failed at overlay %s: the layers' paths are too long", target);
        if (k_mount("overlay", target, "overlay", MS_NOSUID | MS_NODEV, data) < 0)
            internal("sandbox setup failed at overlay %s: %s", target, strerror(errno));
    } else if (strcmp(op, "bind") == 0) {
        /* SECURITY: the target is resolved inside `within` by openat2(RESOLVE_IN_ROOT),
         * and both ends are mounted through /proc/self/fd, so a symlink swapped into
         * the path cannot send the mount outside the sandbox's root (CVE-2021-30465). */
        const char *source = str(r), *target = str(r), *within = str(r);
        int ro = (int)num(r), rec = (int)num(r);
        const char *create = str(r);
        int src = k_open_path(source);
        int dst = src < 0 ? -1 : k_open_in_root(within, target, create);
        if (dst < 0 || k_mount(fdpath(0, src), fdpath(1, dst), NULL, MS_BIND | (rec ? MS_REC : 0), NULL) < 0) {
            if (errno == ENOENT || errno == ENOTDIR)
                user_error("cannot map %s to %s: %s", source, target, strerror(errno));
            internal("sandbox setup failed at bind %s: %s", target, strerror(errno));
        }
        k_close(dst);
        if (ro) {
            int top = k_open_in_root(within, target, create);
            if (top < 0 || remount_readonly(fdpath(1, top)) < 0)
                internal("sandbox setup failed at bind %s (read-only): %s", target, strerror(errno));
            k_close(top);
        }
        k_close(src);
    } else if (strcmp(op, "dev-node") == 0) {
        /* The target lives in the tmpfs this sandbox just mounted on its /dev: nothing
         * untrusted can have put a symlink there, so a plain path is safe. */
        const char *source = str(r), *target = str(r);
        if (k_write_file(target, "", 0, 0666) < 0 || k_mount(source, target, NULL, MS_BIND, NULL) < 0)
            internal("sandbox setup failed at dev-node %s: %s", target, strerror(errno));
    } else if (strcmp(op, "proc") == 0) {
        const char *target = str(r);
        if (k_mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
            internal("sandbox setup failed at proc %s: %s", target, strerror(errno));
    } else if (strcmp(op, "devpts") == 0) {
        const char *target = str(r);
        if (k_mount("devpts", target, "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620") < 0)
            internal("sandbox setup failed at devpts %s: %s", target, strerror(errno));
    } else if (strcmp(op, "mask") == 0) {
        const char *path = str(r);
        int rc = k_is_dir(path)
                     ? k_mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=0,mode=0555")
                     : k_mount("/dev/null", path, NULL, MS_BIND, NULL);
        if (rc < 0 && errno != ENOENT) /* nothing to hide on this kernel */
            internal("sandbox setup failed at mask %s: %s", path, strerror(errno));
    } else if (strcmp(op, "read-only") == 0) {
        const char *path = str(r);
        if (k_mount(path, path, NULL, MS_BIND | MS_REC, NULL) < 0) {
            if (errno != ENOENT)
                internal("sandbox setup failed at read-only %s: %s", path, strerror(errno));
        } else if (remount_readonly(path) < 0) {
            internal("sandbox setup failed at read-only %s: %s", path, strerror(errno));
        }
    } else if (strcmp(op, "unmount") == 0) {
        const char *path = str(r);
        if (k_umount(path, MNT_DETACH) < 0)
            internal("sandbox setup failed at unmount %s: %s", path, strerror(errno));
    } else if (strcmp(op, "pivot-root") == 0) {
        const char *root = str(r);
        if (k_pivot_root(root) < 0)
            internal("sandbox setup failed at pivot-root %s: %s", root, strerror(errno));
    } else if (strcmp(op, "hostname") == 0) {
        if (k_sethostname(str(r)) < 0)
            OP_FAIL("hostname");
    } else if (strcmp(op, "loopback-up") == 0) {
        if (k_loopback_up() < 0)
            OP_FAIL("loopback-up");
    } else {
        internal("malformed setup script (operation %s)", op);
    }
}

/* ---- identity and the exec ---------------------------------------------- */

static void drop_bounding_except(uint64_t keep) {
    /* up to the last capability this kernel knows (EINVAL past it), not a fixed list */
    for (int cap = 0; cap < 64; cap++) {
        if (keep >> cap & 1)
            continue;
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0) {
            if (errno == EINVAL && cap > LAST_CAP)
                break;
            if (errno != EINVAL)
                internal("cannot drop capability %d: %s", cap, strerror(errno));
        }
    }
}

static void set_capabilities(uint64_t keep) {
    struct __user_cap_header_struct header = {.version = _LINUX_CAPABILITY_VERSION_3};
    struct __user_cap_data_struct data[2];
    for (int i = 0; i < 2; i++)
        data[i].effective = data[i].permitted = data[i].inheritable = (uint32_t)(keep >> (32 * i));
    /* SECURITY: capabilities outside `keep` are gone from every set before the
     * sandbox's code runs; ambient holds only what the spec added with --cap. */
    if (syscall(SYS_capset, &header, data) < 0)
        internal("capset: %s", strerror(errno));
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
        internal("clearing ambient capabilities: %s", strerror(errno));
    for (int cap = 0; cap <= LAST_CAP; cap++)
        if ((keep >> cap & 1) && prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0) < 0)
            internal("raising ambient capability %d: %s", cap, strerror(errno));
}

/* `winsize` is rows << 16 | cols, set before the command runs so its first look at the
 * terminal's size is right (0: the client sets it when the master reaches it). */
static void open_pty(long long winsize) {
    int master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
    int unlock = 0;
    unsigned number;
    if (master < 0 || ioctl(master, TIOCSPTLCK, &unlock) < 0 || ioctl(master, TIOCGPTN, &number) < 0)
        internal("cannot open a pty: %s", strerror(errno));
    if (winsize > 0) {
        struct winsize size = {.ws_row = (unsigned short)(winsize >> 16 & 0xffff),
                               .ws_col = (unsigned short)(winsize & 0xffff)};
        ioctl(master, TIOCSWINSZ, &size);
    }
    char name[32];
    snprintf(name, sizeof name, "/dev/pts/%u", number);
    int slave = open(name, O_RDWR);
    if (slave < 0 || ioctl(slave, TIOCSCTTY, 0) < 0)
        internal("cannot open %s: %s", name, strerror(errno));
    for (int i = 0; i < 3; i++)
        if (dup2(slave, i) < 0)
            internal("dup2: %s", strerror(errno));
    close(slave);
    /* the master goes to the spawner, and on to the client */
    if (send_pty(err_fd, master) < 0)
        internal("cannot hand over the pty: %s", strerror(errno));
    close(master);
}

static void install_seccomp(const char *bpf, size_t len) {
    if (!len)
        return;
    if (len % sizeof(struct sock_filter) || len / sizeof(struct sock_filter) > 4096)
        internal("malformed seccomp program (%zu bytes)", len);
    struct sock_fprog prog = {.len = (unsigned short)(len / sizeof(struct sock_filter)),
                              .filter = (struct sock_filter *)(void *)bpf};
    /* SECURITY: from here on every syscall of this process and of everything it
     * forks or execs passes the filter; filters can be stacked but never removed. */
    if (len % sizeof(struct sock_filter) || syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0)
        internal("cannot load the seccomp filter: %s", strerror(errno));
}

static int mkdirs(const char *path, long long uid, long long gid) {
    char buf[PATH_MAX];
    if (path[0] != '/' || strlen(path) >= sizeof buf) {
        errno = path[0] ? ENAMETOOLONG : ENOENT;
        return -1;
    }
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1;; p++) {
        if (*p == '/' || !*p) {
            char saved = *p;
            *p = '\0';
            if (mkdir(buf, 0777) < 0 && errno != EEXIST)
                return -1;
            *p = saved;
            if (!saved)
                break;
        }
    }
    return uid != 0 ? chown(path, (uid_t)uid, (gid_t)gid) : 0;
}

/* The idmapped lower layers: one SOCK_SEQPACKET message "layers" on ERR with n fds. */
static void receive_layers(int n) {
    union {
        struct cmsghdr hdr;
        char space[CMSG_SPACE(MAX_LAYERS * sizeof(int))];
    } control;
    char buf[16];
    struct iovec iov = {.iov_base = buf, .iov_len = sizeof buf};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                         .msg_controllen = sizeof control.space};
    if (n < 0 || n > MAX_LAYERS)
        internal("malformed setup script (idmapped layers)");
    ssize_t got;
    do {
        got = recvmsg(err_fd, &msg, MSG_CMSG_CLOEXEC);
    } while (got < 0 && errno == EINTR);
    struct cmsghdr *c = got == 6 ? CMSG_FIRSTHDR(&msg) : NULL;
    if (!c || memcmp(buf, "layers", 6) != 0 || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS ||
        c->cmsg_len != CMSG_LEN((size_t)n * sizeof(int)) || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)))
        internal("the spawner did not send the %d idmapped layers", n);
    memcpy(layer_fds, CMSG_DATA(c), (size_t)n * sizeof(int));
    n_layers = n;
}

static int move_fd(int fd) {
    if (fd >= 3)
        return fd;
    int moved = fcntl(fd, F_DUPFD, 3);
    if (moved < 0)
        internal("dup: %s", strerror(errno));
    return moved;
}

static void trace_main(const char *file, char **args) {
    tracing = 1;
    trace_args = args;
    setvbuf(stdout, NULL, _IOLBF, 0); /* a failing operation _exits */
    for (n_layers = 0; n_layers < MAX_LAYERS; n_layers++)
        layer_fds[n_layers] = 201 + n_layers;
    int fd = open(file, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        internal("%s: %s", file, strerror(errno));
    size_t len;
    struct reader r = {.p = read_all(fd, &len)};
    r.end = r.p + len;
    while (r.p < r.end)
        run_op(&r);
    exit(0);
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "--trace") == 0)
        trace_main(argv[2], argv + 3);
    if (argc < 8 || argc > 10)
        internal("usage: silo-setup SYNC ERR IN OUT ERRFD INIT SCRIPT [--warm | --join PIDFD] | "
                 "silo-setup --trace FILE [ARG...]");
    /* What spawn.c raised to carry the user namespace's capabilities across the exec:
     * nothing of it may reach the command (the app level keeps no capability set). */
    struct __user_cap_header_struct cap_header = {.version = _LINUX_CAPABILITY_VERSION_3};
    struct __user_cap_data_struct caps[2];
    if (syscall(SYS_capget, &cap_header, caps) < 0)
        internal("capget: %s", strerror(errno));
    caps[0].inheritable = caps[1].inheritable = 0;
    if (syscall(SYS_capset, &cap_header, caps) < 0 || prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
        internal("cannot clear the inherited capabilities: %s", strerror(errno));
    int sync_fd = move_fd(atoi(argv[1])), init_fd = move_fd(atoi(argv[6])), script_fd = move_fd(atoi(argv[7]));
    err_fd = move_fd(atoi(argv[2]));
    int stdio[3] = {move_fd(atoi(argv[3])), move_fd(atoi(argv[4])), move_fd(atoi(argv[5]))};
    int warm = argc == 9 && strcmp(argv[8], "--warm") == 0;
    /* --join: a command for a running workspace, whose init's pidfd this is; the
     * script then has no operations, and we enter the workspace's namespaces instead
     * of building new ones. */
    int join_fd = argc == 10 && strcmp(argv[8], "--join") == 0 ? move_fd(atoi(argv[9])) : -1;
    if (argc == 10 && join_fd < 0)
        internal("usage: silo-setup ... --join PIDFD");
    for (int i = 0; i < 3; i++)
        if (dup2(stdio[i], i) < 0)
            internal("dup2: %s", strerror(errno));

    size_t len;
    struct reader r = {.p = read_all(script_fd, &len)};
    r.end = r.p + len;
    close(script_fd);
    if (strcmp(str(&r), MAGIC) != 0)
        internal("setup script of another silo version: run 'make install'");
    int user_ns = (int)num(&r), mnt_ns = (int)num(&r), pid_ns = (int)num(&r), cgroup_ns = (int)num(&r);
    uid_t inside_uid = (uid_t)num(&r);
    gid_t inside_gid = (gid_t)num(&r);
    int use_setgroups = (int)num(&r);
    int idmapped_layers = (int)num(&r);

    char go;
    ssize_t got;
    do {
        got = read(sync_fd, &go, 1);
    } while (got < 0 && errno == EINTR);
    if (got != 1 || go != 'g')
        _exit(125); /* the parent gave up on us */
    close(sync_fd);
    if (idmapped_layers)
        receive_layers(idmapped_layers);
    if (join_fd >= 0) {
        /* SECURITY: all of the workspace's namespaces at once (the user namespace
         * first); the pid namespace holds our children only, so silo-init --run
         * below stays outside it, invisible to the workspace, and relays the
         * command's status and signals. The spawner has put us in the workspace's
         * cgroup before releasing us. */
        if (setns(join_fd, CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS |
                               CLONE_NEWNET | CLONE_NEWCGROUP) < 0)
            user_error("cannot enter the workspace: %s (did it stop?)", strerror(errno));
        close(join_fd);
    }

    if (user_ns) {
        if (use_setgroups && setgroups(0, NULL) < 0)
            internal("setgroups: %s", strerror(errno));
        if (setresgid(inside_gid, inside_gid, inside_gid) < 0 || setresuid(inside_uid, inside_uid, inside_uid) < 0)
            internal("cannot become the sandbox's root: %s", strerror(errno));
        prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0); /* the identity change cleared spawn.c's */
    }
    if (cgroup_ns && unshare(CLONE_NEWCGROUP) < 0)
        internal("unshare cgroup namespace: %s", strerror(errno));

    for (long long n = num(&r); n > 0; n--)
        run_op(&r);
    for (int i = 0; i < n_layers; i++)
        close(layer_fds[i]); /* attached, or unused: the overlays hold what they need */

    const char *cwd = str(&r);
    long long uid = num(&r), gid = num(&r);
    uint64_t keep = (uint64_t)num(&r);
    int no_new_privs = (int)num(&r), harden = (int)num(&r), new_session = (int)num(&r), tty = (int)num(&r),
        with_init = (int)num(&r);
    long long winsize = num(&r);
    /* With tty: where the command (runsc) hands over the master of a pty it made
     * itself; silo-init listens there and passes it on, and we make none. */
    const char *console = str(&r);
    long long nrlimits = num(&r);
    struct {
        int resource;
        struct rlimit lim;
    } rlimits[16];
    if (nrlimits < 0 || nrlimits > 16)
        internal("malformed setup script (rlimits)");
    for (long long i = 0; i < nrlimits; i++) {
        rlimits[i].resource = (int)num(&r);
        long long soft = num(&r), hard = num(&r);
        rlimits[i].lim.rlim_cur = soft < 0 ? RLIM_INFINITY : (rlim_t)soft;
        rlimits[i].lim.rlim_max = hard < 0 ? RLIM_INFINITY : (rlim_t)hard;
    }
    size_t bpf_len;
    const char *bpf = field(&r, &bpf_len);
    long long nargs = num(&r);
    if (nargs < 0 || nargs > 1 << 20)
        internal("malformed setup script (argv)");
    /* room for silo-init --run FD [--console PATH WINSIZE] -- before the command */
    char **cmd = calloc((size_t)nargs + 8, sizeof *cmd);
    if (!cmd)
        internal("out of memory");
    for (long long i = 0; i < nargs; i++)
        cmd[i + 7] = str(&r);
    long long nenv = num(&r);
    if (nenv < 0 || nenv > 1 << 20)
        internal("malformed setup script (env)");
    char **envp = calloc((size_t)nenv + 1, sizeof *envp);
    if (!cmd || !envp)
        internal("out of memory");
    for (long long i = 0; i < nenv; i++)
        envp[i] = str(&r);

    struct stat st;
    if (mnt_ns && harden && (stat(cwd, &st) < 0 || !S_ISDIR(st.st_mode)) && mkdirs(cwd, uid, gid) < 0)
        user_error("cannot create working directory %s: %s", cwd, strerror(errno));
    if (chdir(cwd) < 0)
        user_error("working directory %s: %s", cwd, strerror(errno));
    char here[PATH_MAX];
    /* SECURITY: a cwd outside the new root has no path from it (CVE-2024-21626). */
    if (pid_ns && (!getcwd(here, sizeof here) || here[0] != '/'))
        user_error("working directory %s is outside the sandbox", cwd);

    if (harden) {
        /* SECURITY: the bounding set loses every capability not asked for, before the
         * identity switch, so nothing exec'd later can regain them (SECURITY.md #8). */
        if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0)
            internal("keepcaps: %s", strerror(errno));
        drop_bounding_except(keep);
        gid_t g = (gid_t)gid;
        if (use_setgroups && setgroups(1, &g) < 0)
            internal("setgroups: %s", strerror(errno));
        if (setresgid(g, g, g) < 0 || setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) < 0)
            internal("cannot switch to the sandbox user: %s", strerror(errno));
        set_capabilities(keep);
        prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0);
    }
    /* SECURITY: no setuid binary or file capability can raise privileges (SECURITY.md #8). */
    if (no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        internal("no_new_privs: %s", strerror(errno));
    /* SECURITY: the sandbox dies with the spawner; set after the last credential
     * change, which would clear it. */
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (!pid_ns && getppid() == 1)
        _exit(125); /* the spawner died before the death signal was armed */
    if (new_session) {
        /* SECURITY: no controlling terminal of the host (SECURITY.md #7). */
        if (setsid() < 0)
            internal("setsid: %s", strerror(errno));
        if (tty && !console[0])
            open_pty(winsize);
    }
    for (long long i = 0; i < nrlimits; i++)
        if (setrlimit((__rlimit_resource_t)rlimits[i].resource, &rlimits[i].lim) < 0)
            internal("setrlimit %d: %s", rlimits[i].resource, strerror(errno));
    /* Default dispositions for everything the spawner (Python: SIGPIPE, SIGXFSZ) left
     * ignored, glibc's reserved 32 and 33 included (exec resets only handled ones). */
    struct {
        void *handler;
        unsigned long flags;
        void *restorer;
        uint64_t mask;
    } dfl = {0};
    for (int sig = 1; sig <= 64; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            syscall(SYS_rt_sigaction, sig, &dfl, NULL, 8);
    /* The signal mask stays full (spawn.c blocked everything before the clone) across
     * the exec of silo-init, so a signal sent meanwhile stays pending for it to forward;
     * only a command exec'd without an init gets an empty mask. */
    /* SECURITY: only stdio (and, warm, the channel to the spawner) crosses into the
     * sandbox's command (SECURITY.md #2). */
    if (syscall(SYS_close_range, 3, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
        internal("close_range: %s", strerror(errno));

    /* silo-init from a sealed memfd (/proc/1/exe is not a host file, CVE-2019-5736),
     * with the channel to the spawner kept open across the exec: warm, it waits there
     * for the command; cold, it resolves the command inside the new root and reports
     * 127 / 126 there. It closes the channel once the command runs. */
    char chan[16];
    snprintf(chan, sizeof chan, "%d", err_fd);
    if (warm || with_init) {
        install_seccomp(bpf, bpf_len);
        fcntl(err_fd, F_SETFD, 0);
        if (warm) {
            char *init_argv[] = {"silo-init", "--wait", chan, NULL};
            char *const empty[] = {NULL};
            syscall(SYS_execveat, init_fd, "", init_argv, empty, AT_EMPTY_PATH);
        } else if (nargs == 0) {
            /* a workspace: silo-init waits as its PID 1, its commands join later */
            char *init_argv[] = {"silo-init", "--idle", chan, NULL};
            syscall(SYS_execveat, init_fd, "", init_argv, envp, AT_EMPTY_PATH);
        } else {
            char size[24];
            snprintf(size, sizeof size, "%lld", winsize);
            char **init_argv = cmd + (console[0] ? 0 : 3);
            init_argv[0] = "silo-init";
            init_argv[1] = "--run";
            init_argv[2] = chan;
            if (console[0]) {
                init_argv[3] = "--console";
                init_argv[4] = (char *)console;
                init_argv[5] = size;
            }
            cmd[6] = "--";
            syscall(SYS_execveat, init_fd, "", init_argv, envp, AT_EMPTY_PATH);
        }
        internal("cannot exec silo-init: %s", strerror(errno));
    }
    if (nargs < 1)
        internal("malformed setup script (no command)");
    install_seccomp(bpf, bpf_len);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    extern char **environ;
    environ = envp; /* execvp searches the command's PATH */
    execvp(cmd[7], cmd + 7);
    report(errno == ENOENT ? "CommandNotFound" : "CommandNotExecutable", errno == ENOENT ? 127 : 126,
           "%s: cannot execute inside the sandbox: %s", cmd[7], strerror(errno));
}
