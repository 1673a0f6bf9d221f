/* silo-agent: PID 1 of a silo VM, twice over.
 *
 * As /init of the initramfs (argv[0] "/init") it is the guest's init: it loads the
 * virtio modules, builds the guest's root (the host's view over virtio-fs under a RAM
 * overlay), copies itself there and switches to it; under TCG each busybox command of
 * the shell script this replaced cost an exec (~20 ms), about 0.45 s a boot.
 *
 * Then, as /.silo/silo-agent in the new root, it is the agent:  * it speaks the agent protocol (src/silo/agent/protocol.py has the layouts) with the
 * host over the virtio-serial port named "silo.agent": it runs the commands the host
 * asks for (pipes or a pty, env, cwd, uid/gid), forwards signals to their process
 * groups, sets window sizes, reports exit codes once a command's output is all sent,
 * reaps every orphan, takes the identity the host gives it (hostname, machine-id, RNG
 * seed: a pooled VM was booted before anybody asked for it), and powers the guest off
 * when asked.
 *
 * Static, so it runs in any guest root (the host's view, or an image with no libc of
 * ours), and starts in a millisecond where a Python agent took a second under TCG.
 * The host is the trusted side here; still, every frame is bounded and checked, and a
 * malformed request gets an ERROR, never a crash of PID 1.
 */
#include <dirent.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ftw.h>
#include <sys/ioctl.h>
#include <linux/random.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/reboot.h>
#include <sys/syscall.h>
#include <time.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>
#include <pty.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <sys/socket.h>

#define VERSION 4
#define SEED_MIN 16
#define SEED_MAX 512
#define MAX_PAYLOAD (1u << 20)
#define CHUNK (64u << 10)
#define HEADER 9
#define MAX_JOBS 64
#define OUTQ_HIGH (4u << 20)   /* stop reading commands' output above this */
#define STDIN_HIGH (4u << 20)  /* stop reading the port while a command's stdin is this far behind */

enum { HELLO = 1, EXEC, STARTED, STDIN_, STDOUT_, STDERR_, CLOSE, SIGNAL_, WINSIZE, EXIT_, ERROR_, SHUTDOWN, IDENTITY,
       USERS };

struct buf {
    unsigned char *data;
    size_t len, cap;
};

struct job {
    int used;
    uint32_t channel;
    pid_t pid;
    int out[2];  /* stdout, stderr read ends (a pty master is out[0]); -1 once closed */
    int in;      /* where the host's stdin goes; -1 once closed */
    int tty;
    int stdin_eof;
    int exited;
    int code;
    struct buf pending;  /* stdin not yet written */
};

static int port = -1;
static struct buf outq, inq;
static struct job jobs[MAX_JOBS];

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("silo-agent: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    sync();
    reboot(RB_POWER_OFF);
    _exit(1);
}

static void buf_add(struct buf *b, const void *data, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        unsigned char *p = realloc(b->data, cap);
        if (!p)
            die("out of memory");
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, n);
    b->len += n;
}

static void buf_drop(struct buf *b, size_t n)
{
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

static void put32(unsigned char *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static uint32_t get32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void flush(void)
{
    while (outq.len) {
        ssize_t n = write(port, outq.data, outq.len < CHUNK ? outq.len : CHUNK);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            die("writing to the host: %s", strerror(errno));
        }
        buf_drop(&outq, n);
    }
}

static void send_frame(int kind, uint32_t channel, const void *payload, size_t n)
{
    unsigned char head[HEADER];
    put32(head, n);
    head[4] = kind;
    put32(head + 5, channel);
    buf_add(&outq, head, HEADER);
    buf_add(&outq, payload, n);
    flush();
}

static void send_u32(int kind, uint32_t channel, uint32_t v)
{
    unsigned char p[4];
    put32(p, v);
    send_frame(kind, channel, p, 4);
}

static void send_error(uint32_t channel, uint32_t code, const char *fmt, ...)
{
    unsigned char p[4 + 1024];
    va_list ap;
    put32(p, code);
    va_start(ap, fmt);
    int n = vsnprintf((char *)p + 4, sizeof p - 4, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n > sizeof p - 5)
        n = sizeof p - 5;
    send_frame(ERROR_, channel, p, 4 + n);
}

static struct job *find_job(uint32_t channel)
{
    for (int i = 0; i < MAX_JOBS; i++)
        if (jobs[i].used && jobs[i].channel == channel)
            return &jobs[i];
    return NULL;
}

static void drop_job(struct job *j)
{
    for (int s = 0; s < 2; s++)
        if (j->out[s] >= 0 && j->out[s] != j->in)
            close(j->out[s]);
    if (j->in >= 0)
        close(j->in);
    free(j->pending.data);
    memset(j, 0, sizeof *j);
}

/* Report the exit once the command ended and its output is all read. */
static void finish(struct job *j)
{
    if (!j->exited || j->out[0] >= 0 || j->out[1] >= 0)
        return;
    send_u32(EXIT_, j->channel, j->code);
    drop_job(j);
}

static void write_stdin(struct job *j)
{
    while (j->in >= 0 && j->pending.len) {
        ssize_t n = write(j->in, j->pending.data, j->pending.len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            j->pending.len = 0;  /* EPIPE: the command closed its stdin */
            break;
        }
        buf_drop(&j->pending, n);
    }
    if (j->in >= 0 && j->stdin_eof && !j->pending.len && !j->tty) {
        close(j->in);
        j->in = -1;
    }
}

/* The executable for argv[0], looked up in the command's own PATH, as the process
 * level's init does: 0, or 127 (nothing by that name) or 126 (found, not executable:
 * `denied` names it). */
static int resolve(const char *name, char **env, char *out, size_t size, char *denied, size_t dsize)
{
    struct stat st;
    denied[0] = 0;
    if (strchr(name, '/')) {
        if (stat(name, &st) < 0)
            return 127;
        if (!S_ISREG(st.st_mode) || access(name, X_OK) < 0) {
            snprintf(denied, dsize, "%s", name);
            return 126;
        }
        return snprintf(out, size, "%s", name) < (int)size ? 0 : 127;
    }
    const char *path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    for (char **e = env; *e; e++)
        if (!strncmp(*e, "PATH=", 5))
            path = *e + 5;
    for (;;) {
        const char *end = strchrnul(path, ':');
        int len = end - path;
        if (snprintf(out, size, "%.*s/%s", len ? len : 1, len ? path : ".", name) < (int)size
            && stat(out, &st) == 0) {
            if (S_ISREG(st.st_mode) && access(out, X_OK) == 0)
                return 0;
            if (!denied[0])
                snprintf(denied, dsize, "%s", out);
        }
        if (!*end)
            break;
        path = end + 1;
    }
    return denied[0] ? 126 : 127;
}

/* The working directory, made when missing (each new directory the command's user's),
 * as the process level's setup does. */
static int make_cwd(const char *cwd, uid_t uid, gid_t gid)
{
    struct stat st;
    if (stat(cwd, &st) == 0)
        return S_ISDIR(st.st_mode) ? 0 : (errno = ENOTDIR, -1);
    char path[4096];
    if (snprintf(path, sizeof path, "%s", cwd) >= (int)sizeof path)
        return errno = ENAMETOOLONG, -1;
    for (char *slash = path + 1;; slash++) {
        char c = *slash;
        if (c != '/' && c != 0)
            continue;
        *slash = 0;
        if (mkdir(path, 0755) == 0) {
            if (chown(path, uid, gid) < 0)
                return -1;
        } else if (errno != EEXIST) {
            return -1;
        }
        *slash = c;
        if (!c)
            return 0;
    }
}

static void do_exec(uint32_t channel, const unsigned char *p, size_t n)
{
    if (channel == 0 || find_job(channel)) {
        send_error(channel, 125, "channel %u is in use", channel);
        return;
    }
    struct job *j = NULL;
    for (int i = 0; i < MAX_JOBS && !j; i++)
        if (!jobs[i].used)
            j = &jobs[i];
    if (!j) {
        send_error(channel, 125, "too many commands running in the VM (at most %d)", MAX_JOBS);
        return;
    }
    if (n < 25) {
        send_error(channel, 125, "exec: a short request");
        return;
    }
    uint32_t uid = get32(p), gid = get32(p + 4);
    unsigned rows = p[8] << 8 | p[9], cols = p[10] << 8 | p[11];
    int tty = p[12];
    uint32_t argc = get32(p + 13), envc = get32(p + 17), nrl = get32(p + 21);
    if (argc < 1 || argc > 65536 || envc > 65536 || nrl > 16 || n < 25 + (size_t)nrl * 20) {
        send_error(channel, 125, "exec: %u arguments, %u variables and %u limits", argc, envc, nrl);
        return;
    }
    /* rlimits: u32 resource, u64 soft, u64 hard each */
    struct { int resource; struct rlimit lim; } limits[16];
    for (uint32_t i = 0; i < nrl; i++) {
        const unsigned char *l = p + 25 + i * 20;
        limits[i].resource = (int)get32(l);
        limits[i].lim.rlim_cur = (rlim_t)get32(l + 4) << 32 | get32(l + 8);
        limits[i].lim.rlim_max = (rlim_t)get32(l + 12) << 32 | get32(l + 16);
    }
    /* cwd, argv..., env..., each ending in NUL, and nothing after */
    const char *strs = (const char *)p + 25 + nrl * 20;
    size_t slen = n - 25 - nrl * 20, at = 0, got = 0;
    char *cwd = NULL, **argv = calloc(argc + 1, sizeof *argv), **env = calloc(envc + 1, sizeof *env);
    if (!argv || !env)
        die("out of memory");
    while (got < 1 + argc + envc && at < slen) {
        const char *end = memchr(strs + at, 0, slen - at);
        if (!end)
            break;
        char *str = (char *)strs + at;
        if (got == 0)
            cwd = str;
        else if (got <= argc)
            argv[got - 1] = str;
        else
            env[got - 1 - argc] = str;
        got++;
        at = end - strs + 1;
    }
    if (got != 1 + argc + envc || at != slen) {
        send_error(channel, 125, "exec: the strings do not match their counts");
        goto out;
    }
    for (uint32_t i = 0; i < envc; i++)
        if (!strchr(env[i], '=')) {
            send_error(channel, 125, "exec: an environment entry without '='");
            goto out;
        }
    char path[4096], denied[4096];
    int missing = resolve(argv[0], env, path, sizeof path, denied, sizeof denied);
    if (missing == 127) {
        send_error(channel, 127, "%s: command not found inside the VM; check the name and PATH", argv[0]);
        goto out;
    }
    if (missing) {
        send_error(channel, 126, "%s: not executable inside the VM (%s); check its mode", argv[0], denied);
        goto out;
    }
    if (make_cwd(cwd, uid, gid) < 0) {
        send_error(channel, 125, "cannot create working directory %s: %s", cwd, strerror(errno));
        goto out;
    }
    int report[2], child[3], mine[3];
    if (pipe2(report, O_CLOEXEC) < 0)
        die("pipe: %s", strerror(errno));
    if (tty) {
        int master, slave;
        struct winsize ws = { .ws_row = rows, .ws_col = cols };
        if (openpty(&master, &slave, NULL, NULL, &ws) < 0) {
            close(report[0]); close(report[1]);
            send_error(channel, 125, "cannot open a terminal in the VM: %s", strerror(errno));
            goto out;
        }
        fcntl(master, F_SETFD, FD_CLOEXEC);
        fcntl(slave, F_SETFD, FD_CLOEXEC);
        child[0] = child[1] = child[2] = slave;
        mine[0] = master; mine[1] = -1; mine[2] = master;
    } else {
        int i[2], o[2], e[2];
        if (pipe2(i, O_CLOEXEC) < 0 || pipe2(o, O_CLOEXEC) < 0 || pipe2(e, O_CLOEXEC) < 0)
            die("pipe: %s", strerror(errno));
        child[0] = i[0]; child[1] = o[1]; child[2] = e[1];
        mine[0] = o[0]; mine[1] = e[0]; mine[2] = i[1];
    }
    pid_t pid = fork();
    if (pid < 0)
        die("fork: %s", strerror(errno));
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        setsid();
        for (int fd = 0; fd < 3; fd++)
            if (dup2(child[fd], fd) < 0)
                goto fail;
        if (tty && ioctl(0, TIOCSCTTY, 0) < 0)
            goto fail;
        for (uint32_t i = 0; i < nrl; i++)
            if (setrlimit(limits[i].resource, &limits[i].lim) < 0)
                goto fail;
        if (setgroups(0, NULL) < 0 || setgid(gid) < 0 || setuid(uid) < 0 || chdir(cwd) < 0)
            goto fail;
        execve(path, argv, env);
    fail:;
        int err = errno;
        (void)!write(report[1], &err, sizeof err);
        _exit(126);
    }
    close(report[1]);
    close(child[0]);
    if (!tty) {
        close(child[1]);
        close(child[2]);
    }
    int err = 0;
    ssize_t r;
    do
        r = read(report[0], &err, sizeof err);
    while (r < 0 && errno == EINTR);
    close(report[0]);
    if (r == sizeof err) {
        waitpid(pid, NULL, 0);
        for (int k = 0; k < 3; k++)
            if (mine[k] >= 0 && !(tty && k == 2))
                close(mine[k]);
        send_error(channel, err == ENOENT ? 127 : 126, "%s: cannot execute inside the VM: %s",
                   argv[0], strerror(err));  /* e.g. a missing interpreter, or a denied cwd */
        goto out;
    }
    memset(j, 0, sizeof *j);
    j->used = 1;
    j->channel = channel;
    j->pid = pid;
    j->out[0] = mine[0];
    j->out[1] = mine[1];
    j->in = mine[2];
    j->tty = tty;
    for (int k = 0; k < 3; k++)
        if (mine[k] >= 0)
            fcntl(mine[k], F_SETFL, fcntl(mine[k], F_GETFL) | O_NONBLOCK);
    send_u32(STARTED, channel, pid);
out:
    free(env);
    free(argv);
}

static int write_file(const char *path, const char *data, size_t n)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0)
        return -1;
    ssize_t w = write(fd, data, n);
    int saved = errno;
    close(fd);
    errno = saved;
    return w == (ssize_t)n ? 0 : -1;
}

/* IDENTITY: u8 n, hostname (n), machine-id (32 hex digits), seed (the rest). */
static void do_identity(const unsigned char *p, size_t n)
{
    if (n < 1 || n < 1u + p[0] + 32 + SEED_MIN || n > 1u + p[0] + 32 + SEED_MAX || p[0] == 0 || p[0] > 63) {
        send_error(0, 125, "identity: bad layout");
        return;
    }
    size_t hn = p[0];
    char host[64], id[33], text[256];
    memcpy(host, p + 1, hn);
    host[hn] = 0;
    memcpy(id, p + 1 + hn, 32);
    id[32] = 0;
    for (size_t i = 0; i < hn; i++)
        if (!(host[i] == '-' || host[i] == '.' || (host[i] >= '0' && host[i] <= '9')
              || ((host[i] | 32) >= 'a' && (host[i] | 32) <= 'z'))) {
            send_error(0, 125, "identity: bad hostname");
            return;
        }
    for (int i = 0; i < 32; i++)
        if (!((id[i] >= '0' && id[i] <= '9') || (id[i] >= 'a' && id[i] <= 'f'))) {
            send_error(0, 125, "identity: bad machine-id");
            return;
        }
    const unsigned char *seed = p + 1 + hn + 32;
    size_t sn = n - 1 - hn - 32;
    struct { struct rand_pool_info info; unsigned char data[SEED_MAX]; } pool;
    pool.info.entropy_count = sn * 8;
    pool.info.buf_size = sn;
    memcpy(pool.data, seed, sn);
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0 || ioctl(fd, RNDADDENTROPY, &pool.info) < 0) {
        send_error(0, 125, "identity: cannot seed the RNG: %s", strerror(errno));
        if (fd >= 0)
            close(fd);
        return;
    }
    close(fd);
    memset(&pool, 0, sizeof pool);
    if (sethostname(host, hn) < 0) {
        send_error(0, 125, "identity: sethostname: %s", strerror(errno));
        return;
    }
    int len = snprintf(text, sizeof text, "%s\n", host);
    if (write_file("/etc/hostname", text, len) < 0) {
        send_error(0, 125, "identity: /etc/hostname: %s", strerror(errno));
        return;
    }
    len = snprintf(text, sizeof text, "127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n", host);
    if (write_file("/etc/hosts", text, len) < 0) {
        send_error(0, 125, "identity: /etc/hosts: %s", strerror(errno));
        return;
    }
    len = snprintf(text, sizeof text, "%s\n", id);
    if (write_file("/etc/machine-id", text, len) < 0)
        send_error(0, 125, "identity: /etc/machine-id: %s", strerror(errno));
}

/* USERS: u32 uid, u32 gid, u32 n, /etc/passwd (n bytes), /etc/group (the rest); the
 * user's home made when it is not root. */
static void do_users(const unsigned char *p, size_t n)
{
    if (n < 12 || get32(p + 8) > n - 12) {
        send_error(0, 125, "users: bad layout");
        return;
    }
    uid_t uid = get32(p);
    gid_t gid = get32(p + 4);
    size_t pn = get32(p + 8);
    mkdir("/etc", 0755);
    if (write_file("/etc/passwd", (const char *)p + 12, pn) < 0
        || write_file("/etc/group", (const char *)p + 12 + pn, n - 12 - pn) < 0) {
        send_error(0, 125, "users: cannot write /etc/passwd and /etc/group: %s", strerror(errno));
        return;
    }
    if (uid != 0) {
        mkdir("/home", 0755);
        if (mkdir("/home/user", 0755) == 0 && chown("/home/user", uid, gid) < 0)
            send_error(0, 125, "users: cannot give /home/user to %u: %s", (unsigned)uid, strerror(errno));
    }
}

/* A workspace's stop: SIGTERM to every process, up to grace_ms for them to go, then
 * SIGKILL, so what they wrote is on the disk before the sync. */
static void stop_all(uint32_t grace_ms)
{
    kill(-1, SIGTERM);
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
        if (waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD)
            return;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long ms = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (ms >= (long)grace_ms)
            break;
        poll(NULL, 0, 10);
    }
    kill(-1, SIGKILL);
    while (waitpid(-1, NULL, 0) > 0)
        ;
}

static void handle(int kind, uint32_t channel, const unsigned char *p, size_t n)
{
    struct job *j = find_job(channel);
    switch (kind) {
    case EXEC:
        do_exec(channel, p, n);
        return;
    case STDIN_:
        if (j && j->in >= 0 && !j->stdin_eof) {
            buf_add(&j->pending, p, n);
            write_stdin(j);
        }
        return;
    case CLOSE:
        if (n != 1 || p[0] != 0) {
            send_error(channel, 125, "close: only stdin (stream 0) can be closed");
            return;
        }
        if (j) {
            j->stdin_eof = 1;
            write_stdin(j);
        }
        return;
    case SIGNAL_:
        if (n != 1 || p[0] < 1 || p[0] > 64) {
            send_error(channel, 125, "signal: not a signal number");
            return;
        }
        if (j && !j->exited && kill(-j->pid, p[0]) < 0)
            kill(j->pid, p[0]);
        return;
    case WINSIZE:
        if (n != 4) {
            send_error(channel, 125, "winsize: not 4 bytes");
            return;
        }
        if (j && j->tty && j->out[0] >= 0) {
            struct winsize ws = { .ws_row = p[0] << 8 | p[1], .ws_col = p[2] << 8 | p[3] };
            ioctl(j->out[0], TIOCSWINSZ, &ws);
        }
        return;
    case IDENTITY:
        do_identity(p, n);
        return;
    case USERS:
        do_users(p, n);
        return;
    case SHUTDOWN:
        if (n == 4)
            stop_all(get32(p));
        sync();
        reboot(RB_POWER_OFF);
        die("power off: %s", strerror(errno));
        return;
    default:
        send_error(channel, 125, "unexpected frame kind %d from the host", kind);
    }
}

static void reap(void)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
        for (int i = 0; i < MAX_JOBS; i++)
            if (jobs[i].used && jobs[i].pid == pid && !jobs[i].exited) {
                jobs[i].exited = 1;
                jobs[i].code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
                finish(&jobs[i]);
            }
}

static void pump(struct job *j, int s)
{
    static unsigned char data[CHUNK];
    ssize_t n = read(j->out[s], data, sizeof data);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n > 0) {
        send_frame(s == 0 ? STDOUT_ : STDERR_, j->channel, data, n);
        return;
    }
    /* EOF, or EIO from a pty whose last writer is gone */
    if (j->out[s] == j->in)
        j->in = -1;
    close(j->out[s]);
    j->out[s] = -1;
    unsigned char stream = s + 1;
    send_frame(CLOSE, j->channel, &stream, 1);
    finish(j);
}

static int open_port(void)
{
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d)
        die("no virtio ports: %s", strerror(errno));
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[512], name[64] = "";
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        FILE *f = fopen(path, "re");
        if (!f)
            continue;
        if (fgets(name, sizeof name, f))
            name[strcspn(name, "\n")] = 0;
        fclose(f);
        if (!strcmp(name, "silo.agent")) {
            snprintf(path, sizeof path, "/dev/%s", e->d_name);
            closedir(d);
            int fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
            if (fd < 0)
                die("cannot open %s: %s", path, strerror(errno));
            return fd;
        }
    }
    die("no virtio port named silo.agent");
    return -1;
}

/* ---- the guest's init ------------------------------------------------------------ */

/* The kernel's command line into buf (empty when /proc cannot tell). */
static void read_cmdline(char *buf, size_t size)
{
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd >= 0 ? read(fd, buf, size - 1) : -1;
    buf[n > 0 ? n : 0] = 0;
    if (fd >= 0)
        close(fd);
}

static int debug_boot;

static void init_fail(const char *what)
{
    int fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
    if (fd >= 0) {
        dprintf(fd, "silo-init: %s: %s\n", what, strerror(errno));
        close(fd);
    }
    sync();
    reboot(RB_POWER_OFF);
    _exit(1);
}

static void mark(const char *what)
{
    if (!debug_boot)
        return;
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    int fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
    if (fd >= 0) {
        dprintf(fd, "silo-init: %ld.%02ld %s\n", (long)ts.tv_sec, ts.tv_nsec / 10000000, what);
        close(fd);
    }
}

static void must_mount(const char *src, const char *target, const char *type, unsigned long flags,
                       const char *data)
{
    if (mount(src, target, type, flags, data) < 0) {
        char what[256];
        snprintf(what, sizeof what, "cannot mount %s on %s", type ? type : src ? src : "(remount)", target);
        init_fail(what);
    }
}

static void must_mkdir(const char *path, mode_t mode)
{
    if (mkdir(path, mode) < 0 && errno != EEXIST) {
        char what[256];
        snprintf(what, sizeof what, "cannot make %s", path);
        init_fail(what);
    }
}

static void load_modules(const char *list_path)
{
    FILE *list = fopen(list_path, "re");
    if (!list)
        init_fail("cannot read the module list");
    char name[128], path[256];
    while (fgets(name, sizeof name, list)) {
        name[strcspn(name, "\n")] = 0;
        if (!name[0])
            continue;
        snprintf(path, sizeof path, "/lib/silo/%s.ko", name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)) {
            char what[300];
            snprintf(what, sizeof what, "cannot load module %s", name);
            init_fail(what);
        }
        close(fd);
    }
    fclose(list);
}

/* The workspace's disk (the first virtio-blk device): ext4 made by the host, on
 * `at`. Over the host's view it holds upper/ and work/ of the root's overlay; an
 * image root's disk is the root itself. Its node appears once virtio_blk has probed. */
static void mount_disk(const char *at, int writable, int overlay)
{
    struct stat st;
    for (int i = 0; stat("/dev/vda", &st) < 0; i++) {
        if (i == 500)
            init_fail("the workspace's disk (/dev/vda) did not appear");
        poll(NULL, 0, 10);
    }
    must_mkdir(at, 0755);
    if (writable)
        must_mount("/dev/vda", at, "ext4", MS_NOATIME, "errors=remount-ro");
    else  /* shared layers: read as they are, no journal replay */
        must_mount("/dev/vda", at, "ext4", MS_RDONLY | MS_NOATIME, "noload");
    if (writable && overlay) {
        must_mkdir("/disk/upper", 0755);
        must_mkdir("/disk/work", 0755);
    }
}

/* A file of the initramfs into the new root's /.silo (which is remounted read-only). */
static void copy_file(const char *from, const char *to)
{
    int in = open(from, O_RDONLY | O_CLOEXEC);
    int out = open(to, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0755);
    if (in < 0 || out < 0)
        init_fail("cannot copy the agent's files into the new root");
    char data[65536];
    ssize_t n;
    while ((n = read(in, data, sizeof data)) > 0)
        if (write(out, data, n) != n)
            init_fail("cannot copy the agent's files into the new root");
    if (n < 0)
        init_fail("cannot copy the agent's files into the new root");
    close(in);
    close(out);
}

static dev_t initramfs_dev;

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)flag;
    if (ftw->level == 0 || st->st_dev != initramfs_dev)
        return 0;
    if (S_ISDIR(st->st_mode))
        rmdir(path);
    else
        unlink(path);
    return 0;
}

static void set_up(int sock, const char *name)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) < 0)
        init_fail("cannot read a network interface's flags");
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(sock, SIOCSIFFLAGS, &ifr) < 0)
        init_fail("cannot bring a network interface up");
}

/* The kernel's in6_ifreq (linux/ipv6.h, which clashes with netinet/in.h). */
struct silo_in6_ifreq {
    struct in6_addr addr;
    uint32_t prefixlen;
    int ifindex;
};

/* silo.net=ADDR4/LEN,GATEWAY4,ADDR6/LEN,GATEWAY6: eth0 (virtio-net, on a tap in the
 * workspace's network namespace, whose policy applies to everything it carries), its
 * addresses and default routes, and silo's resolver at GATEWAY4 (the namespace's end)
 * in the new root's /etc/resolv.conf. The guest may change all of it: what leaves the
 * tap is checked on the host side, never trusted from here. */
static void setup_net(const char *spec)
{
    char buf[256], *field[4], *save = NULL;
    snprintf(buf, sizeof buf, "%s", spec);
    int n = 0;
    for (char *f = strtok_r(buf, ",", &save); f && n < 4; f = strtok_r(NULL, ",", &save))
        field[n++] = f;
    char *len4 = n == 4 ? strchr(field[0], '/') : NULL, *len6 = n == 4 ? strchr(field[2], '/') : NULL;
    struct in_addr a4, g4;
    struct in6_addr a6, g6;
    errno = EINVAL;
    if (!len4 || !len6)
        init_fail("bad silo.net");
    *len4++ = 0;
    *len6++ = 0;
    int p4 = atoi(len4), p6 = atoi(len6);
    if (inet_pton(AF_INET, field[0], &a4) != 1 || inet_pton(AF_INET, field[1], &g4) != 1
        || inet_pton(AF_INET6, field[2], &a6) != 1 || inet_pton(AF_INET6, field[3], &g6) != 1
        || p4 < 1 || p4 > 32 || p6 < 1 || p6 > 128)
        init_fail("bad silo.net");
    unsigned idx = 0;
    for (int i = 0; !(idx = if_nametoindex("eth0")); i++) {
        if (i == 200)
            init_fail("the network interface (eth0) did not appear");
        poll(NULL, 0, 10);
    }
    write_file("/proc/sys/net/ipv6/conf/eth0/accept_dad", "0\n", 2);
    write_file("/proc/sys/net/ipv6/conf/eth0/accept_ra", "0\n", 2);
    write_file("/proc/sys/net/ipv6/conf/eth0/autoconf", "0\n", 2);
    /* unprivileged ping, as the process level allows */
    write_file("/proc/sys/net/ipv4/ping_group_range", "0 2147483647\n", 13);
    int s4 = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s4 < 0)
        init_fail("cannot make a socket");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "eth0");
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    sin->sin_family = AF_INET;
    sin->sin_addr = a4;
    if (ioctl(s4, SIOCSIFADDR, &ifr) < 0)
        init_fail("cannot set eth0's address");
    sin->sin_addr.s_addr = htonl(~0u << (32 - p4));
    if (ioctl(s4, SIOCSIFNETMASK, &ifr) < 0)
        init_fail("cannot set eth0's netmask");
    set_up(s4, "eth0");
    struct rtentry rt;
    memset(&rt, 0, sizeof rt);
    ((struct sockaddr_in *)&rt.rt_dst)->sin_family = AF_INET;
    ((struct sockaddr_in *)&rt.rt_genmask)->sin_family = AF_INET;
    sin = (struct sockaddr_in *)&rt.rt_gateway;
    sin->sin_family = AF_INET;
    sin->sin_addr = g4;
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    if (ioctl(s4, SIOCADDRT, &rt) < 0)
        init_fail("cannot add the default route");
    close(s4);
    int s6 = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s6 >= 0) {  /* a kernel without IPv6 gets IPv4 only */
        struct silo_in6_ifreq r6 = { .addr = a6, .prefixlen = p6, .ifindex = (int)idx };
        if (ioctl(s6, SIOCSIFADDR, &r6) < 0)
            init_fail("cannot set eth0's IPv6 address");
        struct in6_rtmsg rt6;
        memset(&rt6, 0, sizeof rt6);
        rt6.rtmsg_gateway = g6;
        rt6.rtmsg_flags = RTF_UP | RTF_GATEWAY;
        rt6.rtmsg_metric = 1;
        rt6.rtmsg_ifindex = (int)idx;
        if (ioctl(s6, SIOCADDRT, &rt6) < 0)
            init_fail("cannot add the IPv6 default route");
        close(s6);
    }
    char text[128];
    int len = snprintf(text, sizeof text, "# silo's resolver: it answers by the workspace's network policy\n"
                       "nameserver %s\noptions edns0\n", field[1]);
    unlink("/newroot/etc/resolv.conf");  /* the host's may be a link into its /run */
    must_mkdir("/newroot/etc", 0755);
    if (write_file("/newroot/etc/resolv.conf", text, len) < 0)
        init_fail("cannot write /etc/resolv.conf");
}

static void guest_init(void)
{
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0
        || mount("dev", "/dev", "devtmpfs", MS_NOSUID, NULL) < 0)
        init_fail("cannot mount /proc and /dev");
    /* Kernel command line: silo.root=host (the host's view over virtio-fs, read-only,
     * under a RAM overlay) or silo.root=disk (an image root: the disk is the root,
     * read-write, or read-only under a RAM overlay; no virtio-fs), silo.probe (answer the accelerator probe and power off),
     * silo.rwsize=BYTES (the RAM overlay's size), silo.disk=rw (the overlay's upper on
     * the workspace's disk instead of RAM) or silo.disk=ro (the disk's files a read-only
     * layer under the RAM overlay: a disposable workspace on layers), silo.net=... (eth0:
     * setup_net), silo.debug (time each step). */
    char cmdline[4096], root[32] = "host", disk[8] = "", net[256] = "";
    int volumes = 0;
    unsigned long long rwsize = 1ull << 30;
    read_cmdline(cmdline, sizeof cmdline);
    for (char *save = NULL, *arg = strtok_r(cmdline, " \n", &save); arg; arg = strtok_r(NULL, " \n", &save)) {
        if (!strcmp(arg, "silo.probe")) {
            int tty = open("/dev/ttyS0", O_WRONLY | O_NOCTTY | O_CLOEXEC);
            if (tty >= 0 && write(tty, "SILO-PROBE-OK\n", 14) == 14)
                close(tty);
            reboot(RB_POWER_OFF);
            _exit(0);
        }
        if (!strncmp(arg, "silo.root=", 10))
            snprintf(root, sizeof root, "%s", arg + 10);
        else if (!strncmp(arg, "silo.disk=", 10))
            snprintf(disk, sizeof disk, "%s", arg + 10);
        else if (!strncmp(arg, "silo.net=", 9))
            snprintf(net, sizeof net, "%s", arg + 9);
        else if (!strncmp(arg, "silo.rwsize=", 12))
            rwsize = strtoull(arg + 12, NULL, 10);
        else if (!strcmp(arg, "silo.debug"))
            debug_boot = 1;
        else if (!strncmp(arg, "silo.vol=", 9))
            volumes = 1;
    }
    if (disk[0] && strcmp(disk, "rw") && strcmp(disk, "ro")) {
        errno = EINVAL;
        init_fail("unknown silo.disk");
    }
    load_modules("/lib/silo/modules");
    if (disk[0])
        load_modules("/lib/silo/modules.disk");
    if (net[0])
        load_modules("/lib/silo/modules.net");
    mark("modules loaded");
    must_mkdir("/lower", 0755);
    must_mkdir("/rw", 0755);
    must_mkdir("/newroot", 0755);
    int image = !strcmp(root, "disk");  /* an image root: the disk is the root, no host view */
    if ((strcmp(root, "host") && !image) || (image && !disk[0])) {
        errno = EINVAL;
        init_fail("unknown silo.root, or silo.root=disk without silo.disk");
    }
    if (!image) {
        must_mount("host", "/lower", "virtiofs", MS_RDONLY, NULL);
        mark("virtio-fs mounted");
    }
    if (disk[0]) {
        int rw = !strcmp(disk, "rw");
        mount_disk(image ? (rw ? "/newroot" : "/lower") : "/disk", rw, !image);
        mark("disk mounted");
    }
    if (image && !strcmp(disk, "rw")) {
        /* the disk is mounted as the new root already */
    } else if (!strcmp(disk, "rw")) {
        must_mount("root", "/newroot", "overlay", 0, "lowerdir=/lower,upperdir=/disk/upper,workdir=/disk/work");
    } else {
        char opts[128];
        snprintf(opts, sizeof opts, "mode=0755,size=%llu", rwsize);
        must_mount("rw", "/rw", "tmpfs", 0, opts);
        must_mkdir("/rw/upper", 0755);
        must_mkdir("/rw/work", 0755);
        struct stat st;
        if (!image && disk[0] && stat("/disk/upper", &st) == 0)
            must_mount("root", "/newroot", "overlay", 0,
                       "lowerdir=/disk/upper:/lower,upperdir=/rw/upper,workdir=/rw/work");
        else
            must_mount("root", "/newroot", "overlay", 0, "lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work");
    }
    static const char *const dirs[] = { "proc", "sys", "dev", "tmp", "run", "etc", "root", ".silo" };
    char path[128];
    for (size_t i = 0; i < sizeof dirs / sizeof *dirs; i++) {
        snprintf(path, sizeof path, "/newroot/%s", dirs[i]);
        must_mkdir(path, 0755);
    }
    must_mount("proc", "/newroot/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    must_mount("sys", "/newroot/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    must_mount("dev", "/newroot/dev", "devtmpfs", MS_NOSUID, NULL);
    must_mkdir("/newroot/dev/pts", 0755);
    must_mkdir("/newroot/dev/shm", 01777);
    must_mount("devpts", "/newroot/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620");
    unlink("/newroot/dev/ptmx");
    if (symlink("pts/ptmx", "/newroot/dev/ptmx") < 0)
        init_fail("cannot link /dev/ptmx");
    must_mount("shm", "/newroot/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    must_mount("tmp", "/newroot/tmp", "tmpfs", 0, "mode=1777");
    must_mount("run", "/newroot/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
    must_mount("silo", "/newroot/.silo", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=8m");
    copy_file("/init", "/newroot/.silo/silo-agent");
    /* the agent's tools: cp's shell and tar in a root that may have neither */
    copy_file("/lib/silo/busybox", "/newroot/.silo/busybox");
    int lo = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (lo < 0)
        init_fail("cannot make a socket");
    set_up(lo, "lo");
    close(lo);
    if (net[0]) {
        setup_net(net);
        mark("network up");
    }
    if (volumes) {  /* bound onto their targets by the agent, in the new root (bind_volumes) */
        must_mkdir("/newroot/.silo/vols", 0700);
        must_mount("vols", "/newroot/.silo/vols", "virtiofs", MS_NOSUID | MS_NODEV, NULL);
    }
    must_mount(NULL, "/newroot/.silo", NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL);
    mark("root ready");
    umount2("/proc", MNT_DETACH);
    umount2("/dev", MNT_DETACH);
    /* switch_root: free the initramfs (its files, not the new root mounted on it), move
     * the new root onto /, enter it. */
    struct stat st;
    if (stat("/", &st) == 0) {
        initramfs_dev = st.st_dev;
        nftw("/", remove_entry, 16, FTW_DEPTH | FTW_PHYS | FTW_MOUNT);
    }
    if (chdir("/newroot") < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 || chdir("/") < 0)
        init_fail("cannot switch to the new root");
    char *const agent_argv[] = { "/.silo/silo-agent", NULL };
    execv(agent_argv[0], agent_argv);
    init_fail("cannot start the agent");
}

static int unhex(const char *hex, char *out, size_t size)
{
    size_t n = strlen(hex);
    if (n % 2 || n / 2 >= size)
        return -1;
    for (size_t i = 0; i < n / 2; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1 || !isxdigit((unsigned char)hex[2 * i])
            || !isxdigit((unsigned char)hex[2 * i + 1]))
            return -1;
        out[i] = (char)v;
    }
    out[n / 2] = 0;
    return strlen(out) == n / 2 ? 0 : -1;  /* no NUL inside */
}

/* The volumes (-v): the host's virtiofsd exports them as /.silo/vols/0, 1, ... in the
 * order of the silo.vol=rw|ro,d|f,HEX-TARGET arguments; each is bound onto its target
 * (made if missing, with its parents), read-only for ro, and the export itself is then
 * detached, so only the targets show it. Any failure powers the machine off (the host
 * reports the console's last line). */
static void bind_volumes(void)
{
    char cmdline[4096];
    read_cmdline(cmdline, sizeof cmdline);
    int i = 0, fd;
    for (char *save = NULL, *arg = strtok_r(cmdline, " \n", &save); arg; arg = strtok_r(NULL, " \n", &save)) {
        if (strncmp(arg, "silo.vol=", 9))
            continue;
        char target[4096], source[64], parent[4096];
        const char *spec = arg + 9;
        int ro = !strncmp(spec, "ro,", 3), dir = spec[3] == 'd';
        if ((!ro && strncmp(spec, "rw,", 3)) || (spec[3] != 'd' && spec[3] != 'f') || spec[4] != ','
            || unhex(spec + 5, target, sizeof target) < 0 || target[0] != '/')
            die("a bad volume argument %s", arg);
        snprintf(source, sizeof source, "/.silo/vols/%d", i++);
        snprintf(parent, sizeof parent, "%s", target);
        char *slash = strrchr(parent, '/');
        if (slash != parent) {
            *slash = 0;
            if (make_cwd(parent, 0, 0) < 0)
                die("cannot make the volume's directory %s: %s", parent, strerror(errno));
        }
        struct stat st;
        if (stat(target, &st) == 0) {
            if ((S_ISDIR(st.st_mode) ? 1 : 0) != dir)
                die("cannot mount the volume on %s: it is %s in the VM", target, dir ? "a file" : "a directory");
        } else if (dir ? mkdir(target, 0755) < 0 : (fd = open(target, O_CREAT | O_WRONLY | O_CLOEXEC, 0644)) < 0) {
            die("cannot make the volume's mount point %s: %s", target, strerror(errno));
        } else if (!dir) {
            close(fd);
        }
        if (mount(source, target, NULL, MS_BIND | MS_REC, NULL) < 0
            || (ro && mount(NULL, target, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) < 0))
            die("cannot mount the volume on %s: %s", target, strerror(errno));
    }
    if (i)
        umount2("/.silo/vols", MNT_DETACH);
}

int main(int argc, char **argv)
{
    if (getpid() == 1 && argc > 0 && !strcmp(argv[0], "/init"))
        guest_init();
    if (getpid() != 1) {
        /* Started again inside the guest (it is on the guest's /.silo): it would take
         * the host's port, and its errors power the machine off. */
        fputs("silo-agent: runs only as the guest's PID 1\n", stderr);
        return 2;
    }
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGPIPE);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    sigdelset(&mask, SIGPIPE);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0)
        die("signalfd: %s", strerror(errno));
    bind_volumes();
    port = open_port();
    unsigned char hello[8];
    put32(hello, VERSION);
    put32(hello + 4, getpid());
    send_frame(HELLO, 0, hello, sizeof hello);

    struct pollfd fds[2 + 3 * MAX_JOBS];
    struct { struct job *j; int what; } who[2 + 3 * MAX_JOBS];  /* what: 0,1 output; 2 stdin */
    for (;;) {
        size_t backlog = 0;
        for (int i = 0; i < MAX_JOBS; i++)
            if (jobs[i].used)
                backlog = jobs[i].pending.len > backlog ? jobs[i].pending.len : backlog;
        int nfds = 0;
        fds[nfds++] = (struct pollfd){ .fd = sfd, .events = POLLIN };
        fds[nfds++] = (struct pollfd){ .fd = port,
                                       .events = (backlog < STDIN_HIGH ? POLLIN : 0) | (outq.len ? POLLOUT : 0) };
        for (int i = 0; i < MAX_JOBS; i++) {
            struct job *j = &jobs[i];
            if (!j->used)
                continue;
            for (int s = 0; s < 2; s++)
                if (j->out[s] >= 0 && outq.len < OUTQ_HIGH) {
                    who[nfds].j = j; who[nfds].what = s;
                    fds[nfds++] = (struct pollfd){ .fd = j->out[s], .events = POLLIN };
                }
            if (j->in >= 0 && j->pending.len && !j->tty) {
                who[nfds].j = j; who[nfds].what = 2;
                fds[nfds++] = (struct pollfd){ .fd = j->in, .events = POLLOUT };
            }
        }
        if (poll(fds, nfds, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll: %s", strerror(errno));
        }
        if (fds[0].revents) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) == sizeof si)
                ;
            reap();
        }
        if (fds[1].revents & POLLOUT)
            flush();
        if (fds[1].revents & (POLLIN | POLLHUP)) {
            unsigned char data[CHUNK];
            ssize_t n = read(port, data, sizeof data);
            if (n > 0) {
                buf_add(&inq, data, n);
                while (inq.len >= HEADER) {
                    uint32_t len = get32(inq.data), channel = get32(inq.data + 5);
                    int kind = inq.data[4];
                    if (kind < HELLO || kind > USERS || len > MAX_PAYLOAD)
                        die("the host broke the protocol (kind %d, %u bytes)", kind, len);
                    if (inq.len < HEADER + len)
                        break;
                    handle(kind, channel, inq.data + HEADER, len);
                    buf_drop(&inq, HEADER + len);
                }
            } else if (n == 0) {
                /* The host closed its end (virtio-serial reports HUP): wait for it to reopen. */
                poll(NULL, 0, 10);
            }
        }
        for (int i = 2; i < nfds; i++) {
            if (!fds[i].revents)
                continue;
            struct job *j = who[i].j;
            if (!j->used)
                continue;
            if (who[i].what == 2)
                write_stdin(j);
            else if (j->out[who[i].what] == fds[i].fd)
                pump(j, who[i].what);
        }
    }
}
