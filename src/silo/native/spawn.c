/*
 * libsilo-spawn.so: clone a child into new namespaces and exec silo-setup in it
 * without copying the spawner's address space (loaded with ctypes by silo.sys.kernel).
 *
 *   pid_t silo_spawn(unsigned long flags, int exe_fd, char *const argv[],
 *                    const int keep[], int nkeep, int raise_caps, int err_fd);
 *
 * A fork of the (Python) spawner copies its page tables and then takes a
 * copy-on-write fault for every page either side writes until the child execs: about
 * a fifth of the CPU a sandbox cost. This does what glibc's posix_spawn does -
 * clone(CLONE_VM | CLONE_VFORK) on a stack of its own, the caller suspended until
 * the child execs - with namespace flags, which posix_spawn cannot pass.
 *
 * The child shares the caller's memory until its exec, so it makes system calls
 * only: it clears close-on-exec on the fds in keep[], raises every capability it
 * holds into the ambient set when raise_caps (the new user namespace's capabilities
 * would not survive the exec otherwise: its id maps are written only later), and
 * execs exe_fd (a sealed memfd) with an empty environment. If that fails it writes
 * "error InternalError ..." on err_fd and exits 125. All signals stay blocked from
 * before the clone until silo-setup unblocks them, so no handler of the caller's
 * ever runs in the child. Returns the child's pid, or -1 with errno.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#define LAST_CAP 40
#define STACK_SIZE (64 * 1024)

struct request {
    int exe_fd;
    char *const *argv;
    const int *keep;
    int nkeep;
    int raise_caps;
    int err_fd;
};

static void fail(int err_fd, const char *what, int err) {
    /* no strerror: it may translate (and allocate) in memory the caller owns */
    char msg[160] = "error InternalError cannot start silo-setup: ";
    size_t n = strlen(msg);
    for (const char *s = what; *s && n < sizeof msg - 16; s++)
        msg[n++] = *s;
    msg[n++] = ':';
    msg[n++] = ' ';
    msg[n++] = 'e';
    msg[n++] = 'r';
    msg[n++] = 'r';
    msg[n++] = 'n';
    msg[n++] = 'o';
    msg[n++] = ' ';
    char digits[8];
    int d = 0;
    do {
        digits[d++] = (char)('0' + err % 10);
        err /= 10;
    } while (err && d < 7);
    while (d)
        msg[n++] = digits[--d];
    if (write(err_fd, msg, n) < 0) {
        /* the spawner reads the child's exit status anyway */
    }
    syscall(SYS_exit_group, 125);
}

static int child(void *arg) {
    const struct request *r = arg;
    for (int i = 0; i < r->nkeep; i++)
        if (syscall(SYS_fcntl, r->keep[i], F_SETFD, 0) < 0)
            fail(r->err_fd, "fcntl", errno);
    if (r->raise_caps) {
        struct __user_cap_header_struct header = {.version = _LINUX_CAPABILITY_VERSION_3};
        struct __user_cap_data_struct data[2];
        if (syscall(SYS_capget, &header, data) < 0)
            fail(r->err_fd, "capget", errno);
        data[0].inheritable = data[0].permitted;
        data[1].inheritable = data[1].permitted;
        if (syscall(SYS_capset, &header, data) < 0)
            fail(r->err_fd, "capset", errno);
        uint64_t permitted = data[0].permitted | (uint64_t)data[1].permitted << 32;
        for (int cap = 0; cap <= LAST_CAP; cap++)
            if ((permitted >> cap & 1) && syscall(SYS_prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0) < 0)
                fail(r->err_fd, "raising ambient capabilities", errno);
    }
    char *const envp[] = {NULL};
    syscall(SYS_execveat, r->exe_fd, "", r->argv, envp, AT_EMPTY_PATH);
    fail(r->err_fd, "execveat", errno);
    return 125;
}

pid_t silo_spawn(unsigned long flags, int exe_fd, char *const argv[], const int keep[], int nkeep, int raise_caps,
                 int err_fd) {
    /* The caller is suspended until the child execs (CLONE_VFORK): one stack per
     * calling thread is never used by two children at once. */
    static _Thread_local char stack[STACK_SIZE] __attribute__((aligned(16)));
    struct request r = {exe_fd, argv, keep, nkeep, raise_caps, err_fd};
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t pid = clone(child, stack + sizeof stack, (int)(flags | CLONE_VM | CLONE_VFORK | SIGCHLD), &r);
    int err = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    errno = err;
    return pid;
}
