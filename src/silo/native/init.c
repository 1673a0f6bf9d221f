/*
 * silo-init: PID 1 of a process-level sandbox.
 *
 *   silo-init --run FD -- ARGV0 [ARG...]  run ARGV0 (looked up in the PATH of the
 *                                         environment we were given)
 *   silo-init --run FD [--console PATH WINSIZE] [--seccomp HEX] -- ARGV0 [ARG...]
 *                                         the same, for a command that makes its own
 *                                         pty and hands its master over the unix
 *                                         socket PATH (runsc --console-socket: see
 *                                         take_console()), and under the seccomp
 *                                         program HEX (struct sock_filter[], in hex:
 *                                         gVisor's Sentry gets no filter from the
 *                                         host, see load_filter())
 *   silo-init --wait FD                   a warm sandbox: wait on the SOCK_SEQPACKET
 *                                         socket FD for the command, then run it
 *   silo-init --idle FD                   a workspace's PID 1: no command of its own;
 *                                         reap what the workspace's execs leave behind
 *                                         until SIGTERM, then stop them (see idle())
 *
 * FD is silo-setup's channel to the spawner in both modes: "init-error CODE MESSAGE"
 * goes there if the command cannot be started (127: not found, 126: not executable),
 * and it is closed once the command runs.
 *
 * In both modes it forks the command into its own process group (made the
 * foreground group when stdin is a terminal), forwards every signal it receives to
 * that group, reaps every zombie, and exits with the command's status (128+N when
 * signal N killed it). When it exits the kernel kills whatever else is left in the
 * pid namespace. It does what `tini -g` does; it exists because tini cannot be
 * parked before the command is known (see docs/design.md, "Native helpers").
 *
 * The warm request is one packet: "ARGC\0ARGV0\0...ARGVn\0ENV0\0...ENVm\0" (the
 * environment entries are "KEY=VALUE") with exactly three fds attached (SCM_RIGHTS)
 * that become stdin, stdout and stderr. We answer "taken" at once (the spawner may
 * then forget its copies of the fds).
 *
 * Everything here runs inside the sandbox with its seccomp filter, capabilities
 * already dropped and no_new_privs set; it trusts the spawner (which made the
 * socket) and nothing else. Statically linked: image roots have no host libc.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fdpass.h"

#define GO_MAX (64 * 1024) /* the spawner starts larger commands cold */
#define MAX_ARGS 8192

static void die(const char *fmt, ...) {
    va_list ap;
    fputs("silo-init: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(125);
}

/* Report why the command cannot start on the warm channel, then exit with code. */
static void fail(int chan, int code, const char *fmt, ...) {
    char msg[1024];
    char packet[1100];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (chan >= 0) {
        int n = snprintf(packet, sizeof packet, "init-error %d %s", code, msg);
        if (n > 0 && write(chan, packet, (size_t)(n < (int)sizeof packet ? n : (int)sizeof packet - 1)) < 0) {
            /* the spawner is gone: nobody to tell */
        }
    } else {
        fprintf(stderr, "silo: %s\n", msg);
    }
    exit(code);
}

/* Receive the command: argv and envp point into buf; fds[3] become our stdio. */
static void receive(int chan, char *buf, size_t size, char ***argv_out, char ***envp_out) {
    union {
        struct cmsghdr hdr;
        char space[CMSG_SPACE(3 * sizeof(int))];
    } control;
    struct iovec iov = {.iov_base = buf, .iov_len = size - 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                         .msg_control = control.space, .msg_controllen = sizeof control.space};
    ssize_t n;
    do {
        n = recvmsg(chan, &msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n <= 0)
        exit(125); /* the spawner dropped us before sending a run */
    if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))
        die("warm request truncated");
    buf[n] = '\0';

    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (!c || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS ||
        c->cmsg_len != CMSG_LEN(3 * sizeof(int)))
        die("warm request without its three stdio fds");
    int fds[3];
    memcpy(fds, CMSG_DATA(c), sizeof fds);

    /* Acknowledge before anything can fail: from here on this sandbox owns the run. */
    if (write(chan, "taken", 5) != 5)
        exit(125);
    for (int i = 0; i < 3; i++)
        if (dup2(fds[i], i) < 0)
            die("dup2: %s", strerror(errno));
    for (int i = 0; i < 3; i++)
        if (fds[i] > 2)
            close(fds[i]);

    /* Split "ARGC\0ARGV...\0ENV...\0". */
    char *p = buf, *end = buf + n;
    char *stop;
    long argc = strtol(p, &stop, 10);
    if (*stop != '\0' || argc < 1 || argc > MAX_ARGS)
        die("malformed warm request");
    p = stop + 1;
    size_t strings = 0;
    for (char *q = p; q < end; q++)
        strings += (*q == '\0');
    if ((size_t)argc > strings || strings > 2 * MAX_ARGS)
        die("malformed warm request");
    char **argv = calloc((size_t)argc + 1, sizeof *argv);
    char **envp = calloc(strings - (size_t)argc + 1, sizeof *envp);
    if (!argv || !envp)
        die("out of memory");
    size_t i = 0, j = 0;
    for (; p < end; p += strlen(p) + 1) {
        if (i < (size_t)argc)
            argv[i++] = p;
        else
            envp[j++] = p;
    }
    *argv_out = argv;
    *envp_out = envp;
}

static const char *env_get(char **envp, const char *key) {
    size_t len = strlen(key);
    for (; *envp; envp++)
        if (strncmp(*envp, key, len) == 0 && (*envp)[len] == '=')
            return *envp + len + 1;
    return NULL;
}

/* PATH lookup inside the sandbox, as execvp would; errors name what to do. */
static void resolve(int chan, const char *name, char **envp, char *out, size_t size) {
    if (strchr(name, '/')) {
        struct stat st;
        if (stat(name, &st) == 0) {
            if (S_ISREG(st.st_mode) && access(name, X_OK) == 0) {
                snprintf(out, size, "%s", name);
                return;
            }
            fail(chan, 126, "%s: not executable inside the sandbox (%s); check its mode", name, name);
        }
        fail(chan, 127, "%s: command not found inside the sandbox; check the name and PATH", name);
    }
    const char *path = env_get(envp, "PATH");
    if (!path)
        path = "";
    char denied[PATH_MAX] = "";
    const char *dir = path;
    for (;;) {
        const char *colon = strchr(dir, ':');
        size_t dlen = colon ? (size_t)(colon - dir) : strlen(dir);
        char candidate[PATH_MAX];
        int n = dlen ? snprintf(candidate, sizeof candidate, "%.*s/%s", (int)dlen, dir, name)
                     : snprintf(candidate, sizeof candidate, "./%s", name);
        struct stat st;
        if (n > 0 && (size_t)n < sizeof candidate && stat(candidate, &st) == 0) {
            if (S_ISREG(st.st_mode) && access(candidate, X_OK) == 0) {
                snprintf(out, size, "%s", candidate);
                return;
            }
            if (!denied[0])
                snprintf(denied, sizeof denied, "%s", candidate);
        }
        if (!colon)
            break;
        dir = colon + 1;
    }
    if (denied[0])
        fail(chan, 126, "%s: not executable inside the sandbox (%s); check its mode", name, denied);
    fail(chan, 127, "%s: command not found inside the sandbox; check the name and PATH", name);
}

static int exit_code(int status) {
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return 125;
}

/* --seccomp: the program, decoded before the fork so a bad one fails the run. */
static struct sock_fprog decode_filter(int chan, const char *hex) {
    size_t n = strlen(hex) / 2;
    if (strlen(hex) % 2 || n == 0 || n % sizeof(struct sock_filter) || n / sizeof(struct sock_filter) > 4096)
        fail(chan, 125, "malformed seccomp program (%zu hex digits)", strlen(hex));
    unsigned char *bytes = malloc(n);
    if (!bytes)
        fail(chan, 125, "out of memory");
    for (size_t i = 0; i < n; i++) {
        unsigned value;
        if (sscanf(hex + 2 * i, "%2x", &value) != 1)
            fail(chan, 125, "malformed seccomp program (not hex)");
        bytes[i] = (unsigned char)value;
    }
    struct sock_fprog prog = {.len = (unsigned short)(n / sizeof(struct sock_filter)),
                              .filter = (struct sock_filter *)(void *)bytes};
    return prog;
}

/* SECURITY: the command and everything it forks or execs pass the filter from here
 * on (filters stack, never go away); the same program silo-setup loads at the
 * process level, here loaded into gVisor's kernel for the command alone. */
static void load_filter(const struct sock_fprog *prog) {
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 || syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, prog) < 0) {
        fprintf(stderr, "silo: cannot load the seccomp filter: %s\n", strerror(errno));
        _exit(125);
    }
}

static int listen_console(int chan, const char *path) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path)
        fail(chan, 125, "the console socket path is too long: %s", path);
    memcpy(addr.sun_path, path, strlen(path));
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 1) < 0)
        fail(chan, 125, "cannot listen on the console socket %s: %s", path, strerror(errno));
    return fd;
}

/* The master of the pty the command made, from one connection to `listener`: the
 * one terminal fd it carries, or -1. */
static int receive_master(int listener) {
    int conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (conn < 0)
        return -1;
    char buf[64];
    union {
        struct cmsghdr hdr;
        char space[CMSG_SPACE(4 * sizeof(int))];
    } control;
    struct iovec iov = {.iov_base = buf, .iov_len = sizeof buf};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                         .msg_controllen = sizeof control.space};
    ssize_t n = recvmsg(conn, &msg, MSG_CMSG_CLOEXEC);
    close(conn);
    struct cmsghdr *c = n < 0 ? NULL : CMSG_FIRSTHDR(&msg);
    if (!c || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
        return -1;
    int fds[4], count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    memcpy(fds, CMSG_DATA(c), (size_t)count * sizeof(int));
    if (count == 1 && !(msg.msg_flags & MSG_CTRUNC) && isatty(fds[0]))
        return fds[0];
    for (int i = 0; i < count; i++)
        close(fds[i]);
    return -1;
}

/* --console: wait (while the command lives) for the master of the pty it made, size
 * it (`winsize` is rows << 16 | cols; 0: the client sizes it) and hand it to the
 * spawner on the channel as silo-setup hands over its own: "pty" with the fd. Only
 * our own processes share the namespace the socket is in. */
static void take_console(int chan, int listener, pid_t child, long long winsize) {
    for (;;) {
        struct pollfd ready = {.fd = listener, .events = POLLIN};
        if (poll(&ready, 1, 100) > 0) {
            int master = receive_master(listener);
            if (master < 0)
                continue;
            if (winsize > 0) {
                struct winsize size = {.ws_row = (unsigned short)(winsize >> 16 & 0xffff),
                                       .ws_col = (unsigned short)(winsize & 0xffff)};
                ioctl(master, TIOCSWINSZ, &size);
            }
            if (send_pty(chan, master) < 0) {
                /* the spawner is gone: the command dies with us */
            }
            close(master);
            return;
        }
        siginfo_t info = {0};
        if (waitid(P_PID, (id_t)child, &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == child)
            return; /* it ended without a terminal: its status says why */
    }
}

/* A workspace's PID 1. Its commands arrive through joins (silo-setup --join), each
 * under its own silo-init --run outside this pid namespace; orphans are reparented
 * here and reaped. SIGTERM (or SIGINT, SIGHUP) stops the workspace: every other
 * process gets SIGTERM, and we exit once none is left (the daemon sends SIGKILL
 * after its stop timeout; our exit makes the kernel kill whatever remains). */
static int idle(int chan) {
    sigset_t all;
    sigfillset(&all);
    close(chan); /* the daemon sees the end of the channel: the workspace is up */
    int stopping = 0;
    for (;;) {
        siginfo_t info;
        struct timespec tick = {.tv_sec = stopping ? 0 : 5, .tv_nsec = stopping ? 100000000 : 0};
        int sig = sigtimedwait(&all, &info, &tick);
        if (sig == SIGTERM || sig == SIGINT || sig == SIGHUP) {
            if (!stopping)
                kill(-1, SIGTERM);
            stopping = 1;
        }
        for (;;) {
            int status;
            pid_t pid = waitpid(-1, &status, WNOHANG);
            if (pid < 0 && errno == ECHILD && stopping)
                return 0;
            if (pid <= 0)
                break;
        }
    }
}

int main(int argc, char **argv) {
    extern char **environ;
    int chan = -1, listener = -1;
    const char *console = NULL;
    long long winsize = 0;
    struct sock_fprog filter = {0};
    char **cmd, **envp = environ;
    char path[PATH_MAX];
    static char request[GO_MAX + 1];

    /* All signals wait for sigtimedwait below, except the synchronous ones. Blocked
     * from the start (silo-setup execs us with everything blocked): a signal for the
     * command that arrives while we wait for it stays pending and is forwarded once
     * it runs, instead of being dropped as PID 1 drops signals it has no handler for. */
    sigset_t all;
    sigfillset(&all);
    static const int synchronous[] = {SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE, SIGSEGV, SIGSYS};
    for (size_t k = 0; k < sizeof synchronous / sizeof *synchronous; k++)
        sigdelset(&all, synchronous[k]);
    sigprocmask(SIG_SETMASK, &all, NULL);

    if (argc == 3 && strcmp(argv[1], "--idle") == 0) {
        prctl(PR_SET_NAME, "silo-init", 0, 0, 0);
        return idle(atoi(argv[2]));
    }
    if (argc >= 3 && strcmp(argv[1], "--wait") == 0) {
        chan = atoi(argv[2]);
        prctl(PR_SET_NAME, "silo-warm", 0, 0, 0);
        receive(chan, request, sizeof request, &cmd, &envp);
        prctl(PR_SET_NAME, "silo-init", 0, 0, 0);
        resolve(chan, cmd[0], envp, path, sizeof path);
    } else if (argc >= 5 && strcmp(argv[1], "--run") == 0) {
        chan = atoi(argv[2]);
        prctl(PR_SET_NAME, "silo-init", 0, 0, 0); /* not the fd number execveat gave us */
        int i = 3;
        while (i < argc && strcmp(argv[i], "--") != 0) {
            if (strcmp(argv[i], "--console") == 0 && i + 2 < argc) {
                console = argv[i + 1];
                winsize = atoll(argv[i + 2]);
                i += 3;
            } else if (strcmp(argv[i], "--seccomp") == 0 && i + 1 < argc) {
                filter = decode_filter(chan, argv[i + 1]);
                i += 2;
            } else {
                i = argc;
            }
        }
        if (i + 1 >= argc)
            die("usage: silo-init --run FD [--console PATH WINSIZE] [--seccomp HEX] -- ARGV0 [ARG...]");
        cmd = argv + i + 1;
        resolve(chan, cmd[0], envp, path, sizeof path);
        if (console)
            listener = listen_console(chan, console);
    } else {
        die("usage: silo-init --run FD [--console PATH WINSIZE] [--seccomp HEX] -- ARGV0 [ARG...] | "
            "silo-init --wait FD | silo-init --idle FD");
    }

    signal(SIGTTIN, SIG_IGN);
    signal(SIGTTOU, SIG_IGN);

    /* exec failures come back through this pipe (closed on a successful exec) */
    int report[2];
    if (pipe2(report, O_CLOEXEC) < 0)
        die("pipe: %s", strerror(errno));

    int pid1 = getpid() == 1;
    pid_t child = fork();
    if (child < 0)
        fail(chan, 125, "cannot start %s: fork: %s", cmd[0], strerror(errno));
    if (child == 0) {
        close(report[0]);
        /* Joined into a running workspace (we are not its PID 1): the command dies
         * with its relay, which the daemon kills on timeouts and disconnects. What the
         * command leaves running in the background is reparented to the workspace's
         * init and lives on, as it would after 'docker exec'. */
        if (!pid1)
            prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
        setpgid(0, 0);
        if (isatty(STDIN_FILENO))
            tcsetpgrp(STDIN_FILENO, getpgrp()); /* Ctrl-C on a -t terminal reaches the command */
        signal(SIGTTIN, SIG_DFL);
        signal(SIGTTOU, SIG_DFL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        if (chan >= 0)
            close(chan);
        if (listener >= 0)
            close(listener);
        if (filter.len)
            load_filter(&filter);
        execve(path, cmd, envp);
        int err = errno;
        if (write(report[1], &err, sizeof err) < 0) {
            /* nothing else to do */
        }
        _exit(err == ENOENT ? 127 : 126);
    }
    close(report[1]);
    int err = 0;
    ssize_t got;
    do {
        got = read(report[0], &err, sizeof err);
    } while (got < 0 && errno == EINTR);
    close(report[0]);
    if (got == (ssize_t)sizeof err) {
        int status;
        waitpid(child, &status, 0);
        fail(chan, err == ENOENT ? 127 : 126, "%s: cannot execute inside the sandbox: %s", cmd[0], strerror(err));
    }
    if (listener >= 0) {
        take_console(chan, listener, child, winsize);
        close(listener);
        unlink(console);
    }
    if (chan >= 0)
        close(chan); /* the spawner sees the end of the channel: the command runs */

    for (;;) {
        siginfo_t info;
        struct timespec tick = {.tv_sec = 1};
        int sig = sigtimedwait(&all, &info, &tick);
        if (sig > 0 && sig != SIGCHLD) {
            /* forward to the command's process group, or to it alone if it left it */
            if (kill(-child, sig) < 0)
                kill(child, sig);
            continue;
        }
        for (;;) {
            int status;
            pid_t pid = waitpid(-1, &status, WNOHANG);
            if (pid <= 0)
                break;
            if (pid == child)
                return exit_code(status); /* the kernel kills what is left */
        }
    }
}
