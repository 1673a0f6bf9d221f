/*
 * libsilo-spawn.so: clone a child into new namespaces and exec silo-setup in it
 * without copying the spawner's address space (loaded with ctypes by silo.sys.kernel).
 *
 *   pid_t silo_spawn(unsigned long flags, int exe_fd, char *const argv[],
 *                    const int keep[], int nkeep, int raise_caps, const char **what);
 *
 * A fork of the (Python) spawner copies its page tables and then takes a
 * copy-on-write fault for every page either side writes until the child execs: about
 * a fifth of the CPU a sandbox cost. This does what glibc's posix_spawn does -
 * clone(CLONE_VM | CLONE_VFORK) on a stack of its own, the caller suspended until
 * the child execs - with namespace flags, which posix_spawn cannot pass.
 *
 * The child shares the caller's memory until its exec, so it makes system calls
 * only: it marks every fd close-on-exec but those in keep[], arms the parent-death
 * signal, raises every capability it holds into the ambient set when raise_caps (the
 * new user namespace's capabilities would not survive the exec otherwise: its id
 * maps are written only later), and execs exe_fd (a sealed memfd) with an empty
 * environment. All signals stay blocked from before the clone on (silo-setup keeps
 * them so), so no handler of the caller's ever runs in the child. Returns the child's
 * pid, or -1 with errno and *what naming the step that failed (the child is reaped).
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
#include <sys/wait.h>
#include <unistd.h>

#define LAST_CAP 40
#define STACK_SIZE (64 * 1024)

struct request {
    int exe_fd;
    char *const *argv;
    const int *keep;
    int nkeep;
    int raise_caps;
    const char *volatile what; /* set by a child that failed */
    volatile int err;
};

/* Report the failure to the caller (posix_spawn's way: through the memory we share
 * with it until we exit) and exit. */
static void __attribute__((noreturn)) fail(struct request *r, const char *what, int err) {
    r->what = what;
    r->err = err;
    syscall(SYS_exit_group, 125);
    __builtin_unreachable();
}

static int child(void *arg) {
    struct request *r = arg;
    /* SECURITY: nothing of the spawner's crosses the exec but keep[]: descriptors it
     * left inheritable included. The sandbox dies with the spawner from here on. */
    if (syscall(SYS_close_range, 3, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
        fail(r, "close_range", errno);
    if (syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
        fail(r, "prctl", errno);
    for (int i = 0; i < r->nkeep; i++)
        if (syscall(SYS_fcntl, r->keep[i], F_SETFD, 0) < 0)
            fail(r, "fcntl", errno);
    if (r->raise_caps) {
        struct __user_cap_header_struct header = {.version = _LINUX_CAPABILITY_VERSION_3};
        struct __user_cap_data_struct data[2];
        if (syscall(SYS_capget, &header, data) < 0)
            fail(r, "capget", errno);
        data[0].inheritable = data[0].permitted;
        data[1].inheritable = data[1].permitted;
        if (syscall(SYS_capset, &header, data) < 0)
            fail(r, "capset", errno);
        uint64_t permitted = data[0].permitted | (uint64_t)data[1].permitted << 32;
        for (int cap = 0; cap <= LAST_CAP; cap++)
            if ((permitted >> cap & 1) && syscall(SYS_prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0) < 0)
                fail(r, "raising ambient capabilities", errno);
    }
    char *const envp[] = {NULL};
    syscall(SYS_execveat, r->exe_fd, "", r->argv, envp, AT_EMPTY_PATH);
    fail(r, "execveat", errno);
    return 125;
}

pid_t silo_spawn(unsigned long flags, int exe_fd, char *const argv[], const int keep[], int nkeep, int raise_caps,
                 const char **what) {
    /* The caller is suspended until the child execs or exits (CLONE_VFORK): one stack
     * per calling thread is never used by two children at once. */
    static _Thread_local char stack[STACK_SIZE] __attribute__((aligned(16)));
    struct request r = {exe_fd, argv, keep, nkeep, raise_caps, NULL, 0};
    /* every signal, glibc's reserved 32 and 33 too (pthread_sigmask would keep those) */
    uint64_t all = ~0ULL, old;
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &all, &old, sizeof all);
    pid_t pid = clone(child, stack + sizeof stack, (int)(flags | CLONE_VM | CLONE_VFORK | SIGCHLD), &r);
    int err = errno;
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &old, NULL, sizeof old);
    if (pid > 0 && r.err) {
        /* the child failed before its exec and exited: reap it, report why */
        int status;
        waitpid(pid, &status, 0);
        *what = r.what;
        errno = r.err;
        return -1;
    }
    *what = "clone";
    errno = err;
    return pid;
}
