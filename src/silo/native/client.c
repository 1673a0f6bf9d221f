/*
 * silo: the fast path of `silo run`, a thin client of the per-user CLI server.
 *
 * `silo run` may cost little more than bubblewrap, and a Python interpreter's startup
 * alone costs more than that. This program does what silo/cli/client.py does for
 * `silo run` -- send argv, cwd, environment and our stdio fds to the CLI server
 * (silo/cli/server.py), forward signals, drive the pty of `-t`, exit with the
 * sandbox's code -- and hands everything else to that Python client: other verbs,
 * `run --help`, and every case it cannot serve before a sandbox may have started
 * (no server yet, a stale one, an unexpected hello reply). The Python client starts
 * or replaces the server, so the next `silo run` is served here again. Once the
 * request is sent it never falls back: a sandbox may be running.
 *
 * Messages are Python `marshal` data, one per SOCK_SEQPACKET packet
 * (silo/spawner/protocol.py): a small encoder writes the requests, a small decoder
 * reads the replies. The server is our own (same uid), but a malformed reply is
 * still a one-line error, never a crash.
 *
 * Built by `python -m silo.cli.launcher install` with SILO_PYTHON (the virtualenv's
 * interpreter) and SILO_SRC (the absolute, normalised path of the source tree).
 */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <locale.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <termios.h>
#include <unistd.h>

#if !defined(SILO_PYTHON) || !defined(SILO_SRC)
#error "build with -DSILO_PYTHON=... -DSILO_SRC=... (python -m silo.cli.launcher install)"
#endif

#define MAX_MESSAGE (1 << 20) /* protocol.MAX_MESSAGE */
#define MAX_VALUES 4096       /* decoded objects per reply; real replies have a handful */
#define MAX_DEPTH 32          /* nesting of decoded containers */
#define MAX_TREE 64           /* directory depth of the code token's walk */
#define CHUNK 65536           /* pty pumping */
#define EXIT_SILO 125
#define JOB 1 /* our job's id on the connection: the only one */

/* The Python client with the user's arguments; the source path comes as argv[1] so
 * that no path needs quoting inside Python code. */
static const char PY_CODE[] = "import sys; sys.path.insert(0, sys.argv.pop(1)); "
                              "from silo.cli.client import main; main()";

extern char **environ;

static int g_argc;
static int exec_mode; /* `silo exec`: silod's exec.sock, plain-text replies */
static char **g_argv;

/* ---- exits ----------------------------------------------------------------------- */

static struct termios saved_tty;
static volatile sig_atomic_t tty_raw; /* our stdin terminal is in raw mode (-t) */

static void restore_tty(void)
{
    if (tty_raw) {
        tcsetattr(0, TCSADRAIN, &saved_tty);
        tty_raw = 0;
    }
}

/* "silo: " PREFIX TEXT "\n" on stderr in one write, then exit(code). */
static void __attribute__((noreturn)) die_text(int code, const char *prefix, const char *text, size_t len)
{
    restore_tty();
    struct iovec iov[4] = {
        {(void *)"silo: ", 6}, {(void *)prefix, strlen(prefix)}, {(void *)text, len}, {(void *)"\n", 1},
    };
    ssize_t n = writev(2, iov, 4);
    (void)n;
    exit(code);
}

static void __attribute__((noreturn, format(printf, 2, 3))) die(int code, const char *fmt, ...)
{
    char line[8192];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    die_text(code, "", line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

/* Hand the whole command line to the Python client. Only before the request is sent. */
static void __attribute__((noreturn)) fallback(void)
{
    char **args = calloc((size_t)g_argc + 5, sizeof *args);
    if (args == NULL)
        die(EXIT_SILO, "out of memory");
    int n = 0;
    args[n++] = SILO_PYTHON;
    args[n++] = "-IS";
    args[n++] = "-c";
    args[n++] = (char *)PY_CODE;
    args[n++] = SILO_SRC;
    for (int i = 1; i < g_argc; i++)
        args[n++] = g_argv[i];
    execv(SILO_PYTHON, args);
    die(EXIT_SILO, "cannot run %s: %s", SILO_PYTHON, strerror(errno));
}

/* ---- marshal: encoder ------------------------------------------------------------- */

/* The message being written; grows up to MAX_MESSAGE. */
static struct {
    unsigned char *data;
    size_t len, cap;
    int too_big;
} out;

static void out_put(const void *p, size_t n)
{
    if (out.too_big)
        return;
    if (n > MAX_MESSAGE - out.len) {
        out.too_big = 1;
        return;
    }
    if (out.len + n > out.cap) {
        size_t cap = out.cap ? out.cap : 4096;
        while (cap < out.len + n)
            cap *= 2;
        unsigned char *data = realloc(out.data, cap);
        if (data == NULL)
            die(EXIT_SILO, "out of memory");
        out.data = data;
        out.cap = cap;
    }
    memcpy(out.data + out.len, p, n);
    out.len += n;
}

static void out_byte(unsigned char c) { out_put(&c, 1); }

static void le32(unsigned char *b, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        b[i] = (unsigned char)(v >> (8 * i));
}

static void out_u32(uint32_t v)
{
    unsigned char b[4];
    le32(b, v);
    out_put(b, 4);
}

static void out_int(int32_t v)
{
    out_byte('i');
    out_u32((uint32_t)v);
}

static void out_tuple(uint32_t n)
{
    out_byte('(');
    out_u32(n);
}

/* Length of the valid UTF-8 sequence at p (as Python's strict decoder sees it), 0 if
 * invalid. Stops at a NUL, which is never a continuation byte. */
static size_t utf8_len(const unsigned char *p, size_t avail)
{
    unsigned char c = p[0], lo = 0x80, hi = 0xbf;
    size_t n;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf)
        n = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        lo = c == 0xe0 ? 0xa0 : lo; /* no overlong forms */
        hi = c == 0xed ? 0x9f : hi; /* no surrogates */
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        lo = c == 0xf0 ? 0x90 : lo;
        hi = c == 0xf4 ? 0x8f : hi; /* nothing above U+10FFFF */
    } else
        return 0;
    if (avail < n || p[1] < lo || p[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++)
        if ((p[i] & 0xc0) != 0x80)
            return 0;
    return n;
}

/* A str: 'u', length, UTF-8. Our strings are bytes, which Python decodes (argv,
 * environment, cwd) as UTF-8 with surrogateescape: each byte of an invalid sequence
 * becomes U+DC80..U+DCFF, which marshal writes as three bytes (surrogatepass). */
static void out_str(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s, *end = p + n;
    out_byte('u');
    size_t at = out.len;
    out_u32(0);
    while (p < end) {
        const unsigned char *run = p;
        size_t k;
        while (p < end && (k = utf8_len(p, (size_t)(end - p))) != 0)
            p += k;
        out_put(run, (size_t)(p - run));
        if (p < end) {
            unsigned char esc[3] = {0xed, 0xb0 | (*p >> 6), 0x80 | (*p & 0x3f)};
            out_put(esc, 3);
            p++;
        }
    }
    if (!out.too_big)
        le32(out.data + at, (uint32_t)(out.len - at - 4));
}

static void out_cstr(const char *s) { out_str(s, strlen(s)); }

/* ---- marshal: decoder ------------------------------------------------------------- */

enum kind { K_NONE, K_BOOL, K_INT, K_STR, K_TUPLE, K_LIST, K_DICT };

struct value {
    enum kind kind;
    long long num;       /* K_BOOL, K_INT */
    const char *str;     /* K_STR: points into the packet, not NUL-terminated */
    uint32_t len;        /* K_STR */
    uint32_t first, cnt; /* containers: kids[first .. first+cnt); a dict alternates key, value */
};

static struct value values[MAX_VALUES];
static uint32_t kids[MAX_VALUES];    /* children of containers, contiguous per container */
static uint32_t pending[MAX_VALUES]; /* children of the containers being decoded */
static uint32_t refs[MAX_VALUES];    /* marshal's reference table (FLAG_REF, 'r') */

struct reader {
    const unsigned char *p, *end;
    uint32_t nvalues, nkids, npending, nrefs;
};

#define FLAG_REF 0x80

static int read_u32(struct reader *r, uint32_t *v)
{
    if (r->end - r->p < 4)
        return -1;
    *v = (uint32_t)r->p[0] | (uint32_t)r->p[1] << 8 | (uint32_t)r->p[2] << 16 | (uint32_t)r->p[3] << 24;
    r->p += 4;
    return 0;
}

static long decode(struct reader *r, int depth);

/* The items of a tuple or list (n of them) or a dict (pairs up to '0'). */
static long read_items(struct reader *r, uint32_t at, int is_dict, uint32_t n, int depth)
{
    uint32_t base = r->npending, done = 0;
    if (n > (size_t)(r->end - r->p)) /* each item takes a byte at least */
        return -1;
    for (;;) {
        if (is_dict) {
            if (r->p >= r->end)
                return -1;
            if (*r->p == '0') {
                r->p++;
                break;
            }
        } else if (done == n)
            break;
        for (int i = 0; i < 1 + is_dict; i++) {
            long item = decode(r, depth + 1);
            if (item < 0 || r->npending >= MAX_VALUES)
                return -1;
            pending[r->npending++] = (uint32_t)item;
        }
        done++;
    }
    struct value *v = &values[at];
    v->first = r->nkids;
    v->cnt = r->npending - base;
    if (v->cnt > MAX_VALUES - r->nkids)
        return -1;
    memcpy(&kids[r->nkids], &pending[base], v->cnt * sizeof *kids);
    r->nkids += v->cnt;
    r->npending = base;
    return at;
}

/* 'l': a Python int beyond 32 bits, in 15-bit digits. Up to 60 bits here. */
static long read_long(struct reader *r, uint32_t at)
{
    uint32_t u;
    if (read_u32(r, &u) != 0)
        return -1;
    int32_t n = (int32_t)u;
    uint32_t digits = n < 0 ? -(uint32_t)n : (uint32_t)n;
    if (digits > 4 || (size_t)(r->end - r->p) < 2 * digits)
        return -1;
    unsigned long long num = 0;
    for (uint32_t i = 0; i < digits; i++) {
        unsigned d = r->p[0] | r->p[1] << 8;
        if (d >= 1u << 15)
            return -1;
        num |= (unsigned long long)d << (15 * i);
        r->p += 2;
    }
    values[at].kind = K_INT;
    values[at].num = n < 0 ? -(long long)num : (long long)num;
    return at;
}

/* One object; its index in values[], -1 if the data is malformed or unsupported. */
static long decode(struct reader *r, int depth)
{
    if (depth > MAX_DEPTH || r->p >= r->end)
        return -1;
    unsigned char code = *r->p++;
    int flag = code & FLAG_REF;
    code &= (unsigned char)~FLAG_REF;
    if (code == 'r') {
        uint32_t i;
        if (read_u32(r, &i) != 0 || i >= r->nrefs)
            return -1;
        return refs[i];
    }
    if (r->nvalues >= MAX_VALUES)
        return -1;
    uint32_t at = r->nvalues++;
    struct value *v = &values[at];
    memset(v, 0, sizeof *v);
    if (flag) /* a container is referable before its items, as in marshal.c */
        refs[r->nrefs++] = at; /* nrefs <= nvalues <= MAX_VALUES */
    uint32_t n;
    switch (code) {
    case 'N':
        v->kind = K_NONE;
        return at;
    case 'T':
    case 'F':
        v->kind = K_BOOL;
        v->num = code == 'T';
        return at;
    case 'i':
        if (read_u32(r, &n) != 0)
            return -1;
        v->kind = K_INT;
        v->num = (int32_t)n;
        return at;
    case 'l':
        return read_long(r, at);
    case 'u': /* str */
    case 't': /* interned str */
    case 'a': /* ASCII str */
    case 'A': /* interned ASCII str */
    case 'z': /* short ASCII str */
    case 'Z': /* short interned ASCII str */
        if (code == 'z' || code == 'Z') {
            if (r->p >= r->end)
                return -1;
            n = *r->p++;
        } else if (read_u32(r, &n) != 0)
            return -1;
        if (n > (size_t)(r->end - r->p))
            return -1;
        v->kind = K_STR;
        v->str = (const char *)r->p;
        v->len = n;
        r->p += n;
        return at;
    case ')': /* small tuple */
        if (r->p >= r->end)
            return -1;
        v->kind = K_TUPLE;
        return read_items(r, at, 0, *r->p++, depth);
    case '(':
    case '[':
        if (read_u32(r, &n) != 0)
            return -1;
        v->kind = code == '(' ? K_TUPLE : K_LIST;
        return read_items(r, at, 0, n, depth);
    case '{':
        v->kind = K_DICT;
        return read_items(r, at, 1, 0, depth);
    default:
        return -1;
    }
}

/* Item i of a tuple or list, NULL if there is none. */
static const struct value *item(const struct value *v, uint32_t i)
{
    if (v == NULL || (v->kind != K_TUPLE && v->kind != K_LIST) || i >= v->cnt)
        return NULL;
    return &values[kids[v->first + i]];
}

static int str_is(const struct value *v, const char *s)
{
    return v != NULL && v->kind == K_STR && v->len == strlen(s) && memcmp(v->str, s, v->len) == 0;
}

/* d[key] for a str key (the last of duplicates wins, as in marshal.loads). */
static const struct value *dict_get(const struct value *d, const char *key)
{
    const struct value *found = NULL;
    if (d == NULL || d->kind != K_DICT)
        return NULL;
    for (uint32_t i = 0; i + 1 < d->cnt; i += 2)
        if (str_is(&values[kids[d->first + i]], key))
            found = &values[kids[d->first + i + 1]];
    return found;
}

/* ---- messages --------------------------------------------------------------------- */

/* Send the encoded message, with our stdin, stdout and stderr if `stdio`. */
static int send_stdin; /* the fd sent as the command's stdin: 0, or /dev/null for `exec` without -i */

static int send_out(int sock, int stdio)
{
    int fds[3] = {send_stdin, 1, 2};
    union {
        char buf[CMSG_SPACE(sizeof fds)];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {out.data, out.len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (stdio) {
        memset(&ctl, 0, sizeof ctl);
        msg.msg_control = ctl.buf;
        msg.msg_controllen = sizeof ctl.buf;
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof fds);
        memcpy(CMSG_DATA(cmsg), fds, sizeof fds);
    }
    ssize_t n;
    do
        n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n == (ssize_t)out.len ? 0 : -1;
}

enum { REPLY_MALFORMED = -1, REPLY_CLOSED = 0, REPLY_OK = 1 };

/* One reply, decoded into *msg (a tuple with a str first). Its first fd is kept in
 * *fd (-1 if none) and *nfds counts them; any other fd is closed. */
static int recv_reply(int sock, const struct value **msg, int *fd, int *nfds)
{
    static unsigned char buf[MAX_MESSAGE];
    union {
        char buf[CMSG_SPACE(8 * sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {buf, sizeof buf};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf};
    ssize_t n;
    do
        n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    *fd = -1;
    *nfds = 0;
    if (n >= 0)
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c != NULL; c = CMSG_NXTHDR(&m, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
                int got;
                memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof got);
                if (*fd == -1)
                    *fd = got;
                else
                    close(got);
                ++*nfds;
            }
        }
    if (n <= 0 || (m.msg_flags & MSG_TRUNC)) {
        if (*fd != -1)
            close(*fd);
        *fd = -1;
        return n <= 0 ? REPLY_CLOSED : REPLY_MALFORMED;
    }
    struct reader r = {.p = buf, .end = buf + n};
    long root = decode(&r, 0);
    *msg = root < 0 ? NULL : &values[root];
    if (*msg == NULL || (*msg)->kind != K_TUPLE || item(*msg, 0) == NULL || item(*msg, 0)->kind != K_STR) {
        if (*fd != -1)
            close(*fd);
        *fd = -1;
        return REPLY_MALFORMED;
    }
    return REPLY_OK;
}

/* ---- where the server is, and which code it must run ------------------------------ */

/* os.path.join(a, b) for a relative b. */
static int join(char *dst, size_t size, const char *a, const char *b)
{
    size_t n = strlen(a);
    const char *sep = n > 0 && a[n - 1] == '/' ? "" : "/";
    int len = snprintf(dst, size, "%s%s%s", a, sep, b);
    return len < 0 || (size_t)len >= size ? -1 : 0;
}

/* paths.runtime_dir() */
static int runtime_dir(char *dst, size_t size)
{
    const char *dir = getenv("SILO_RUNTIME_DIR"), *xdg = getenv("XDG_RUNTIME_DIR");
    struct stat st;
    int len;
    if (dir != NULL && *dir != '\0')
        len = snprintf(dst, size, "%s", dir);
    else if (geteuid() == 0)
        len = snprintf(dst, size, "/run/silo");
    else if (xdg != NULL && *xdg != '\0' && stat(xdg, &st) == 0 && S_ISDIR(st.st_mode))
        return join(dst, size, xdg, "silo");
    else
        len = snprintf(dst, size, "/tmp/silo-%u", (unsigned)geteuid());
    return len < 0 || (size_t)len >= size ? -1 : 0;
}

static int ends_with(const char *s, size_t n, const char *suffix)
{
    size_t k = strlen(suffix);
    return n >= k && memcmp(s + n - k, suffix, k) == 0;
}

/* The walk of paths.code_token(): .py and .json files count (mtime of what a symlink
 * points to), directories are entered unless their name starts with "_" or ".". */
static int walk(int dirfd, int depth, unsigned long *count, long long *newest)
{
    DIR *d = fdopendir(dirfd);
    if (d == NULL) {
        close(dirfd);
        return -1;
    }
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && (e = readdir(d)) != NULL) {
        const char *name = e->d_name;
        size_t n = strlen(name);
        struct stat st;
        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
            continue;
        if (ends_with(name, n, ".py") || ends_with(name, n, ".json")) {
            if (fstatat(dirfd, name, &st, 0) != 0)
                rc = -1;
            else {
                long long ns = (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
                *newest = ns > *newest ? ns : *newest;
                ++*count;
            }
        } else if (name[0] != '_' && name[0] != '.') {
            /* DirEntry.is_dir(): d_type, or stat() for symlinks and unknown types */
            int is_dir = e->d_type == DT_DIR;
            if (e->d_type == DT_LNK || e->d_type == DT_UNKNOWN)
                is_dir = fstatat(dirfd, name, &st, 0) == 0 && S_ISDIR(st.st_mode);
            if (is_dir) {
                int sub = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                rc = sub < 0 || depth >= MAX_TREE ? -1 : walk(sub, depth + 1, count, newest);
                if (sub >= 0 && depth >= MAX_TREE)
                    close(sub);
            }
        }
    }
    closedir(d);
    return rc;
}

/* paths.code_token(): the server retires when ours differs from its own. */
static int code_token(char *dst, size_t size)
{
    char top[4096];
    unsigned long count = 0;
    long long newest = 0;
    if (join(top, sizeof top, SILO_SRC, "silo") != 0)
        return -1;
    int fd = open(top, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || walk(fd, 0, &count, &newest) != 0)
        return -1;
    int len = snprintf(dst, size, "%s:%lu:%lld", top, count, newest);
    return len < 0 || (size_t)len >= size ? -1 : 0;
}

/* Connected to a server that runs our code, or -1. */
static int connect_server(void)
{
    char dir[4096], path[4096 + 32], token[4096 + 64];
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (runtime_dir(dir, sizeof dir) != 0 || join(path, sizeof path, dir, "spawner.sock") != 0
        || strlen(path) >= sizeof addr.sun_path)
        return -1;
    memcpy(addr.sun_path, path, strlen(path) + 1);
    if (code_token(token, sizeof token) != 0)
        return -1;
    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return -1;
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0)
        goto fail;
    out.len = 0;
    out_tuple(2);
    out_cstr("hello");
    out_cstr(token);
    const struct value *reply;
    int fd, nfds;
    if (out.too_big || send_out(sock, 0) != 0 || recv_reply(sock, &reply, &fd, &nfds) != REPLY_OK)
        goto fail;
    if (fd != -1)
        close(fd);
    if (str_is(item(reply, 0), "ok"))
        return sock;
fail: /* e.g. ("restart",): that server retired, the Python client starts a new one */
    close(sock);
    return -1;
}

/* ---- the request ------------------------------------------------------------------ */

/* Python's startup (PEP 538) sets LC_CTYPE=C.UTF-8 in its environment when the
 * LC_CTYPE locale is the legacy "C" one and LC_ALL is unset, and the Python client
 * sent that environment; so do we. The value to use for LC_CTYPE, or NULL. */
static const char *coerced_lc_ctype(void)
{
    static const char *const targets[] = {"C.UTF-8", "C.utf8", "UTF-8"};
    const char *all = getenv("LC_ALL");
    if (all != NULL && *all != '\0')
        return NULL;
    setlocale(LC_CTYPE, "");
    const char *now = setlocale(LC_CTYPE, NULL);
    if (now == NULL || strcmp(now, "C") != 0)
        return NULL;
    for (size_t i = 0; i < sizeof targets / sizeof *targets; i++)
        if (setlocale(LC_CTYPE, targets[i]) != NULL)
            return targets[i];
    return NULL;
}

/* dict(os.environ): entries without "=" are skipped and the first of duplicate
 * names wins (os.environ is filled with setdefault). */
static void out_environ(const char *lc_ctype)
{
    size_t n = 0, cap = 64;
    while (environ[n] != NULL)
        n++;
    while (cap < 2 * n)
        cap *= 2;
    size_t *seen = calloc(cap, sizeof *seen); /* open addressing: index + 1 of a name */
    if (seen == NULL)
        die(EXIT_SILO, "out of memory");
    int has_lc_ctype = 0;
    out_byte('{');
    for (size_t i = 0; i < n; i++) {
        const char *entry = environ[i], *eq = strchr(entry, '=');
        if (eq == NULL)
            continue;
        size_t klen = (size_t)(eq - entry), h = 2166136261u;
        for (size_t k = 0; k < klen; k++)
            h = (h ^ (unsigned char)entry[k]) * 16777619u;
        int dup = 0;
        for (h &= cap - 1; seen[h] != 0 && !dup; h = (h + 1) & (cap - 1))
            dup = strncmp(environ[seen[h] - 1], entry, klen + 1) == 0;
        if (dup)
            continue;
        seen[h] = i + 1;
        out_str(entry, klen);
        if (lc_ctype != NULL && klen == 8 && memcmp(entry, "LC_CTYPE", 8) == 0) {
            out_cstr(lc_ctype);
            has_lc_ctype = 1;
        } else
            out_cstr(eq + 1);
    }
    if (lc_ctype != NULL && !has_lc_ctype) { /* setenv() appends a new name */
        out_cstr("LC_CTYPE");
        out_cstr(lc_ctype);
    }
    out_byte('0');
    free(seen);
}

/* ("cli", JOB, argv, cwd, env, False) */
static void encode_request(int argc, char **argv, const char *cwd)
{
    const char *lc_ctype = coerced_lc_ctype();
    out.len = 0;
    out_tuple(6);
    out_cstr("cli");
    out_int(JOB);
    out_byte('[');
    out_u32((uint32_t)argc);
    for (int i = 0; i < argc; i++)
        out_cstr(argv[i]);
    out_cstr(cwd);
    out_environ(lc_ctype);
    out_byte('F');
}

/* ---- waiting for the sandbox ------------------------------------------------------ */

static const int FORWARD[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
/* Signals whose default action ends us: put the terminal back first. */
static const int FATAL[] = {SIGABRT, SIGALRM, SIGBUS, SIGFPE, SIGILL, SIGSEGV, SIGSYS, SIGTRAP,
                            SIGVTALRM, SIGPROF, SIGXCPU, SIGXFSZ, SIGIO, SIGPWR, SIGSTKFLT};

struct session {
    int sock, sigfd;
    int master;       /* the sandbox's pty master (-t), -1 before ("pty", job) or after EOF */
    int stdin_open;   /* copying our stdin to the master */
    unsigned char in[CHUNK]; /* read from stdin, not yet written to the master */
    size_t in_len, in_off;
};

static void on_fatal(int sig)
{
    if (tty_raw)
        tcsetattr(0, TCSADRAIN, &saved_tty);
    signal(sig, SIG_DFL);
    raise(sig); /* delivered with the default action once this handler returns */
}

static void copy_winsize(int master)
{
    struct winsize ws;
    if (ioctl(0, TIOCGWINSZ, &ws) == 0)
        ioctl(master, TIOCSWINSZ, &ws);
}

/* All of it to stdout (waiting if stdout is non-blocking); -1 if stdout is gone. */
static int write_stdout(const unsigned char *p, size_t n)
{
    while (n > 0) {
        ssize_t k = write(1, p, n);
        if (k < 0 && errno == EAGAIN) {
            struct pollfd pfd = {1, POLLOUT, 0};
            poll(&pfd, 1, -1);
            continue;
        }
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Stop driving the pty: EOF or error on the master, or our stdout is gone (then the
 * sandbox sees its terminal hang up, as when a terminal window closes). */
static void detach(struct session *s)
{
    close(s->master);
    s->master = -1;
    s->stdin_open = 0;
    s->in_len = s->in_off = 0;
}

/* ("pty", job) + the master: our terminal drives the sandbox's. */
static void attach(struct session *s, int master)
{
    s->master = master;
    fcntl(master, F_SETFL, fcntl(master, F_GETFL) | O_NONBLOCK);
    copy_winsize(master);
    if (isatty(0) && (!exec_mode || send_stdin == 0) && tcgetattr(0, &saved_tty) == 0) {
        struct termios raw = saved_tty;
        struct sigaction sa = {.sa_handler = on_fatal};
        cfmakeraw(&raw);
        for (size_t i = 0; i < sizeof FATAL / sizeof *FATAL; i++)
            sigaction(FATAL[i], &sa, NULL);
        tty_raw = 1;
        tcsetattr(0, TCSAFLUSH, &raw);
    }
    s->stdin_open = 1;
}

static void pump_master(struct session *s, short revents)
{
    if ((revents & POLLOUT) && s->in_len > s->in_off) {
        ssize_t k = write(s->master, s->in + s->in_off, s->in_len - s->in_off);
        if (k > 0)
            s->in_off += (size_t)k;
        else if (k < 0 && errno != EAGAIN && errno != EINTR) {
            detach(s);
            return;
        }
        if (s->in_off == s->in_len)
            s->in_len = s->in_off = 0;
    }
    if (revents & (POLLIN | POLLHUP | POLLERR)) {
        unsigned char buf[CHUNK];
        ssize_t k = read(s->master, buf, sizeof buf);
        if (k > 0) {
            if (write_stdout(buf, (size_t)k) != 0)
                detach(s);
        } else if (k == 0 || (errno != EAGAIN && errno != EINTR))
            detach(s); /* EIO: no process has the terminal open any more */
    }
}

static void pump_stdin(struct session *s)
{
    ssize_t k = read(0, s->in, sizeof s->in);
    if (k > 0) {
        s->in_len = (size_t)k;
        s->in_off = 0;
    } else if (k == 0 || (errno != EAGAIN && errno != EINTR))
        s->stdin_open = 0; /* the sandbox's terminal stays open, as in the Python client */
}

/* What is left in the master once the sandbox exited. The kernel moves pty data to
 * the master asynchronously, but once no process has the terminal open a read only
 * fails (EIO) after all of it: read until then, waiting a little if it is slow. */
static void drain(struct session *s)
{
    unsigned char buf[CHUNK];
    struct pollfd p = {s->master, POLLIN, 0};
    while (s->master >= 0 && poll(&p, 1, 200) > 0) {
        ssize_t k = read(s->master, buf, sizeof buf);
        if (k < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (k <= 0 || write_stdout(buf, (size_t)k) != 0)
            break;
    }
}

static void forward_signals(struct session *s)
{
    struct signalfd_siginfo si;
    while (read(s->sigfd, &si, sizeof si) == (ssize_t)sizeof si) {
        if (si.ssi_signo == SIGWINCH) {
            if (s->master >= 0)
                copy_winsize(s->master);
            continue;
        }
        if (exec_mode) {
            char text[32];
            int len = snprintf(text, sizeof text, "signal %d", (int)si.ssi_signo);
            if (send(s->sock, text, (size_t)len, MSG_NOSIGNAL) < 0) {
                /* the daemon is gone: the socket says so next */
            }
            continue;
        }
        out.len = 0;
        out_tuple(3);
        out_cstr("signal");
        out_int(JOB);
        out_int((int32_t)si.ssi_signo);
        send_out(s->sock, 0); /* if the server is gone, the socket says so next */
    }
}

/* ("error", job, {"class": ..., "message": ...}): one line, and the class's code. */
static void __attribute__((noreturn)) error_exit(const struct value *err)
{
    const struct value *message = dict_get(err, "message"), *cls = dict_get(err, "class");
    int code = str_is(cls, "CommandNotFound") ? 127 : str_is(cls, "CommandNotExecutable") ? 126 : EXIT_SILO;
    if (message != NULL && message->kind == K_STR)
        die_text(code, "", message->str, message->len);
    die_text(code, "", "error", 5);
}

/* ("exit", job, code, reason) */
static void __attribute__((noreturn)) exit_with(struct session *s, const struct value *reply)
{
    const struct value *code = item(reply, 2), *reason = item(reply, 3);
    if (code == NULL || code->kind != K_INT)
        die(EXIT_SILO, "malformed reply from silo's server");
    drain(s);
    restore_tty();
    if (reason != NULL && reason->kind == K_STR && reason->len > 0) {
        const char *words = str_is(reason, "memory") ? "its memory limit"
                            : str_is(reason, "pids")  ? "its process limit"
                            : str_is(reason, "timeout") ? "its timeout"
                                                        : NULL;
        die_text((int)code->num, "the sandbox was killed: it hit ", words ? words : reason->str,
                 words ? strlen(words) : reason->len);
    }
    exit((int)code->num);
}

static void on_reply(struct session *s)
{
    const struct value *reply;
    int fd, nfds;
    int rc = recv_reply(s->sock, &reply, &fd, &nfds);
    if (rc == REPLY_MALFORMED)
        die(EXIT_SILO, "malformed reply from silo's server");
    if (rc == REPLY_CLOSED)
        die(EXIT_SILO, "silo's server went away; the sandbox was killed");
    const struct value *kind = item(reply, 0);
    if (str_is(kind, "pty") && nfds == 1 && s->master < 0) {
        attach(s, fd);
        return;
    }
    if (fd != -1)
        close(fd);
    if (str_is(kind, "error"))
        error_exit(item(reply, 2));
    if (str_is(kind, "exit"))
        exit_with(s, reply);
    /* "started" and anything else: keep waiting, as the Python client does */
}

/* Send the request with our stdio and serve the session until a reply ends it:
 * forwarded signals arrive only through the signalfd (a write to a closed stdout is
 * an error, not our death), `on_reply` handles the peer's packets, and our stdin is
 * copied to a pty master only when `read_stdin`. */
static void __attribute__((noreturn)) drive(int sock, const char *peer, void (*on_reply)(struct session *),
                                            int read_stdin)
{
    sigset_t set;
    sigemptyset(&set);
    for (size_t i = 0; i < sizeof FORWARD / sizeof *FORWARD; i++)
        sigaddset(&set, FORWARD[i]);
    sigaddset(&set, SIGWINCH);
    sigprocmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    static struct session s;
    s.sock = sock;
    s.master = -1;
    s.sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (s.sigfd < 0)
        die(EXIT_SILO, "signalfd: %s", strerror(errno));
    if (send_out(sock, 1) != 0)
        die(EXIT_SILO, "cannot send the request to %s: %s", peer, strerror(errno));

    for (;;) {
        struct pollfd p[4] = {{sock, POLLIN, 0}, {s.sigfd, POLLIN, 0}};
        int n = 2, at_master = -1, at_stdin = -1;
        if (s.master >= 0) {
            at_master = n;
            p[n++] = (struct pollfd){s.master, (short)(POLLIN | (s.in_len ? POLLOUT : 0)), 0};
        }
        if (s.stdin_open && read_stdin && s.in_len == 0) {
            at_stdin = n;
            p[n++] = (struct pollfd){0, POLLIN, 0};
        }
        if (poll(p, (nfds_t)n, -1) < 0) {
            if (errno == EINTR)
                continue;
            die(EXIT_SILO, "poll: %s", strerror(errno));
        }
        if (p[1].revents)
            forward_signals(&s);
        if (at_master >= 0 && p[at_master].revents && s.master >= 0)
            pump_master(&s, p[at_master].revents);
        if (at_stdin >= 0 && p[at_stdin].revents && s.stdin_open)
            pump_stdin(&s);
        if (p[0].revents)
            on_reply(&s);
    }
}

static void __attribute__((noreturn)) run(int argc, char **argv)
{
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0)
            die(EXIT_SILO, "file descriptor %d (standard %s) is closed", fd,
                fd == 0 ? "input" : fd == 1 ? "output" : "error");
    int sock = connect_server();
    if (sock < 0)
        fallback(); /* no server, a stale one, a path we cannot use, or unreadable code */
    char *cwd = getcwd(NULL, 0);
    if (cwd == NULL)
        fallback();
    encode_request(argc, argv, cwd);
    if (out.too_big)
        die(EXIT_SILO, "the command line and environment are too large (over %d bytes)", MAX_MESSAGE);

    /* From here on a sandbox may run (the command may run before the first reply). */
    drive(sock, "silo's server", on_reply, 1);
}

/* ---- `silo exec`: silod's streamed exec (docs/api.md, "Streamed exec") ------------- */

static void out_field(const char *key, const char *value)
{
    out_put(key, strlen(key) + 1);
    out_put(value, strlen(value) + 1);
}

/* paths.exec_socket() */
static int exec_socket(char *dst, size_t size)
{
    const char *dir = getenv("SILO_DAEMON_DIR");
    char base[4096];
    if (dir != NULL && *dir != '\0')
        return join(dst, size, dir, "exec.sock");
    if (geteuid() == 0 && (getenv("SILO_RUNTIME_DIR") == NULL || *getenv("SILO_RUNTIME_DIR") == '\0'))
        return join(dst, size, "/run/silod", "exec.sock");
    if (runtime_dir(base, sizeof base) != 0)
        return -1;
    return join(dst, size, base, "exec.sock");
}

/* "started PID", "pty" + the master, "exit CODE", "error CLASS MESSAGE" */
static void on_exec_reply(struct session *s)
{
    static char buf[8192];
    union {
        char buf[CMSG_SPACE(4 * sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {buf, sizeof buf - 1};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf};
    ssize_t n;
    do
        n = recvmsg(s->sock, &m, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    int fd = -1;
    if (n >= 0)
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c != NULL; c = CMSG_NXTHDR(&m, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
                    int got;
                    memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof got);
                    if (fd == -1)
                        fd = got;
                    else
                        close(got);
                }
    if (n <= 0) {
        restore_tty();
        die(EXIT_SILO, "silod went away; the command was killed");
    }
    buf[n] = '\0';
    if (n == 3 && memcmp(buf, "pty", 3) == 0 && fd >= 0 && s->master < 0) {
        attach(s, fd);
        return;
    }
    if (fd != -1)
        close(fd);
    if (strncmp(buf, "exit ", 5) == 0) {
        drain(s);
        restore_tty();
        exit(atoi(buf + 5));
    }
    if (strncmp(buf, "error ", 6) == 0) {
        char *cls = buf + 6, *message = strchr(cls, ' ');
        if (message != NULL)
            *message++ = '\0';
        int code = strcmp(cls, "CommandNotFound") == 0 ? 127 : strcmp(cls, "CommandNotExecutable") == 0 ? 126 : EXIT_SILO;
        restore_tty();
        die_text(code, "", message ? message : "error", message ? strlen(message) : 5);
    }
    /* "started PID": keep waiting */
}

static void __attribute__((noreturn)) exec_cmd(int argc, char **argv)
{
    int tty = 0, interactive = 0, i = 0;
    const char *workdir = NULL, *user = NULL;
    char *envs[256];
    int nenv = 0;
    for (; i < argc && argv[i][0] == '-' && argv[i][1] != '\0'; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0)
            fallback(); /* no name before '--': let the Python CLI explain */
        if (strcmp(a, "-t") == 0 || strcmp(a, "--tty") == 0)
            tty = 1;
        else if (strcmp(a, "-i") == 0 || strcmp(a, "--interactive") == 0)
            interactive = 1;
        else if (strcmp(a, "-it") == 0 || strcmp(a, "-ti") == 0)
            tty = interactive = 1;
        else if ((strcmp(a, "-e") == 0 || strcmp(a, "--env") == 0) && i + 1 < argc && nenv < 256
                 && strchr(argv[i + 1], '=') != NULL && argv[i + 1][0] != '=')
            envs[nenv++] = argv[++i];
        else if ((strcmp(a, "-w") == 0 || strcmp(a, "--workdir") == 0) && i + 1 < argc)
            workdir = argv[++i];
        else if ((strcmp(a, "-u") == 0 || strcmp(a, "--user") == 0) && i + 1 < argc)
            user = argv[++i];
        else
            fallback(); /* --help, a bad option, anything unusual: the Python CLI */
    }
    if (i >= argc)
        fallback();
    const char *name = argv[i++];
    if (i < argc && strcmp(argv[i], "--") == 0)
        i++;
    if (i >= argc)
        fallback();
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0)
            die(EXIT_SILO, "file descriptor %d (standard %s) is closed", fd,
                fd == 0 ? "input" : fd == 1 ? "output" : "error");
    char path[4096];
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (exec_socket(path, sizeof path) != 0 || strlen(path) >= sizeof addr.sun_path)
        fallback();
    memcpy(addr.sun_path, path, strlen(path) + 1);
    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0)
        fallback(); /* no daemon yet: the Python CLI starts it */
    exec_mode = 1;
    out.len = 0;
    out_field("name", name);
    for (; i < argc; i++)
        out_field("arg", argv[i]);
    for (int k = 0; k < nenv; k++)
        out_field("env", envs[k]);
    if (workdir)
        out_field("workdir", workdir);
    if (user)
        out_field("user", user);
    if (tty) {
        out_field("tty", "1");
        if (getenv("TERM"))
            out_field("term", getenv("TERM"));
        struct winsize size;
        if (ioctl(0, TIOCGWINSZ, &size) == 0) { /* sized before the command first looks */
            char rows[8], cols[8];
            snprintf(rows, sizeof rows, "%u", size.ws_row);
            snprintf(cols, sizeof cols, "%u", size.ws_col);
            out_field("rows", rows);
            out_field("cols", cols);
        }
    }
    if (out.too_big)
        die(EXIT_SILO, "the command line is too large (over %d bytes)", MAX_MESSAGE);
    if (!interactive) {
        /* the command's stdin is /dev/null; ours stays, for the terminal's size (-t) */
        send_stdin = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (send_stdin < 0)
            die(EXIT_SILO, "/dev/null: %s", strerror(errno));
    }
    drive(sock, "silod", on_exec_reply, interactive);
}

int main(int argc, char **argv)
{
    g_argc = argc;
    g_argv = argv;
    if (argc >= 2 && strcmp(argv[1], "exec") == 0)
        exec_cmd(argc - 2, argv + 2);
    if (argc < 2 || strcmp(argv[1], "run") != 0
        || (argc > 2 && (strcmp(argv[2], "-h") == 0 || strcmp(argv[2], "--help") == 0)))
        fallback();
    run(argc - 2, argv + 2);
}
