/* Shared by silo-setup and silo-init: hand a pty master to the spawner on its channel. */
#ifndef SILO_FDPASS_H
#define SILO_FDPASS_H

#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

/* One "pty" packet on `sock` carrying `fd` (SCM_RIGHTS); sendmsg's result. */
static inline int send_pty(int sock, int fd) {
    union {
        struct cmsghdr hdr;
        char space[CMSG_SPACE(sizeof(int))];
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {.iov_base = "pty", .iov_len = 3};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                         .msg_controllen = sizeof control.space};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    return (int)sendmsg(sock, &msg, 0);
}

#endif
