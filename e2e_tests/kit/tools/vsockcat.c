/*
 * vsockcat: a tiny netcat for AF_VSOCK stream sockets, for the kit's Linux guest.
 *
 *   vsockcat [-v] connect <cid> <port>   connect to <cid>:<port> (the host is cid 2)
 *   vsockcat [-v] listen <port>          accept ONE connection on <port> (any cid)
 *
 * Then it copies stdin to the socket and the socket to stdout at the same time. When stdin
 * ends it half-closes the socket (shutdown(SHUT_WR)), so the peer sees EOF but can still
 * answer; it exits once stdin has ended AND the peer has closed its side, so neither
 * direction loses data. Any failure prints ONE line "vsockcat: <what>: <strerror>" on stderr
 * and exits 1 (a connect to a port nobody listens on: "Connection reset by peer", because a
 * vsock peer answers such a request with RST). Usage errors exit 2. With -v it prints the
 * listening port and the accepted peer on stderr (tests wait for "listening").
 *
 * Built by the kit with `gcc -static -O2` (e2e_tests/kit/_build.py): busybox has no vsock
 * applet, and a static binary needs no libraries in the initramfs. Written for this project.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define BUF_SIZE (64 * 1024)

static int verbose;

static void die(const char *what) {
    fprintf(stderr, "vsockcat: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void usage(void) {
    fprintf(stderr, "usage: vsockcat [-v] connect <cid> <port> | vsockcat [-v] listen <port>\n");
    exit(2);
}

static unsigned parse_u32(const char *text, const char *what) {
    char *end;
    errno = 0;
    unsigned long v = strtoul(text, &end, 0);
    if (errno || end == text || *end || v > UINT_MAX || text[0] == '-') {
        fprintf(stderr, "vsockcat: bad %s: %s\n", what, text);
        exit(2);
    }
    return (unsigned)v;
}

static int vsock_socket(void) {
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket(AF_VSOCK)");
    return fd;
}

static int do_connect(unsigned cid, unsigned port) {
    int fd = vsock_socket();
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("connect");
    return fd;
}

static int do_listen(unsigned port) {
    int srv = vsock_socket();
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    if (bind(srv, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("bind");
    if (listen(srv, 1) < 0)
        die("listen");
    if (verbose)
        fprintf(stderr, "vsockcat: listening on port %u\n", port);
    struct sockaddr_vm peer;
    socklen_t len = sizeof peer;
    int fd;
    do
        fd = accept4(srv, (struct sockaddr *)&peer, &len, SOCK_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        die("accept");
    if (verbose)
        fprintf(stderr, "vsockcat: connection from %u:%u\n", peer.svm_cid, peer.svm_port);
    close(srv);
    return fd;
}

/* A one-way copy: bytes read from `in` wait in `buf` until `out` takes them. */
struct pipe_state {
    char buf[BUF_SIZE];
    size_t start, end;
    int eof; /* `in` has ended (and, for stdin->socket, the socket is half-closed) */
};

static int pending(const struct pipe_state *p) { return p->end > p->start; }

/* Read into an empty buffer; returns 0 on EOF. */
static ssize_t fill(struct pipe_state *p, int fd, const char *what) {
    ssize_t n = read(fd, p->buf, sizeof p->buf);
    if (n < 0) {
        if (errno == EINTR || errno == EAGAIN)
            return -1;
        die(what);
    }
    p->start = 0;
    p->end = (size_t)n;
    return n;
}

static void drain(struct pipe_state *p, int fd, const char *what) {
    ssize_t n = write(fd, p->buf + p->start, p->end - p->start);
    if (n < 0) {
        if (errno == EINTR || errno == EAGAIN)
            return;
        die(what);
    }
    p->start += (size_t)n;
}

static int pump(int sock) {
    static struct pipe_state up, down; /* up: stdin -> socket, down: socket -> stdout */
    if (fcntl(sock, F_SETFL, fcntl(sock, F_GETFL) | O_NONBLOCK) < 0)
        die("fcntl");
    while (!(up.eof && down.eof)) {
        struct pollfd fds[3] = {{-1, 0, 0}, {-1, 0, 0}, {-1, 0, 0}};
        if (!up.eof && !pending(&up))
            fds[0] = (struct pollfd){STDIN_FILENO, POLLIN, 0};
        short sock_events = 0;
        if (pending(&up))
            sock_events |= POLLOUT;
        if (!down.eof && !pending(&down))
            sock_events |= POLLIN;
        if (sock_events) /* else a pending error would make poll() spin: seen at the next send */
            fds[1] = (struct pollfd){sock, sock_events, 0};
        if (pending(&down))
            fds[2] = (struct pollfd){STDOUT_FILENO, POLLOUT, 0};
        if (poll(fds, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (fds[0].revents) {
            if (fill(&up, STDIN_FILENO, "read stdin") == 0) {
                if (shutdown(sock, SHUT_WR) < 0)
                    die("shutdown");
                up.eof = 1;
            }
        }
        if (fds[1].revents & (POLLOUT | POLLERR | POLLHUP) && pending(&up))
            drain(&up, sock, "send");
        if (fds[1].revents & (POLLIN | POLLERR | POLLHUP) && !down.eof && !pending(&down)) {
            if (fill(&down, sock, "recv") == 0)
                down.eof = 1;
        }
        if (fds[2].revents)
            drain(&down, STDOUT_FILENO, "write stdout");
    }
    if (close(sock) < 0)
        die("close");
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN); /* a closed peer or stdout is an EPIPE error, reported */
    int i = 1;
    if (i < argc && strcmp(argv[i], "-v") == 0) {
        verbose = 1;
        i++;
    }
    if (i >= argc)
        usage();
    int sock;
    if (strcmp(argv[i], "connect") == 0 && argc - i == 3)
        sock = do_connect(parse_u32(argv[i + 1], "cid"), parse_u32(argv[i + 2], "port"));
    else if (strcmp(argv[i], "listen") == 0 && argc - i == 2)
        sock = do_listen(parse_u32(argv[i + 1], "port"));
    else
        usage();
    return pump(sock);
}
