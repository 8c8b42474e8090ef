/* A guest-side vsock tool for the lab tests (busybox has no AF_VSOCK).
 *   vsock-echo listen PORT          accept one connection, echo one line back, exit
 *   vsock-echo connect CID PORT MSG send MSG + "\n", print "VSOCK-REPLY <line>", exit
 * Prints "VSOCK-LISTENING PORT" once listen() returned, so the host knows when to connect. */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int read_line(int fd, char *buf, size_t cap) {
    size_t n = 0;
    while (n + 1 < cap) {
        ssize_t r = read(fd, buf + n, 1);
        if (r <= 0) break;
        if (buf[n++] == '\n') break;
    }
    buf[n] = 0;
    return (int)n;
}

int main(int argc, char **argv) {
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK};
    char line[4096];
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0) { perror("socket"); return 1; }
    if (argc == 3 && !strcmp(argv[1], "listen")) {
        addr.svm_cid = VMADDR_CID_ANY;
        addr.svm_port = (unsigned)atoi(argv[2]);
        if (bind(fd, (struct sockaddr *)&addr, sizeof addr) || listen(fd, 1)) {
            perror("bind/listen"); return 1;
        }
        printf("VSOCK-LISTENING %s\n", argv[2]);
        fflush(stdout);
        int c = accept(fd, NULL, NULL);
        if (c < 0) { perror("accept"); return 1; }
        int n = read_line(c, line, sizeof line);
        if (write(c, line, n) != n) { perror("write"); return 1; }
        printf("VSOCK-ECHOED %d\n", n);
        close(c);
        return 0;
    }
    if (argc == 5 && !strcmp(argv[1], "connect")) {
        addr.svm_cid = (unsigned)atoi(argv[2]);
        addr.svm_port = (unsigned)atoi(argv[3]);
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr)) { perror("connect"); return 1; }
        snprintf(line, sizeof line, "%s\n", argv[4]);
        if (write(fd, line, strlen(line)) < 0) { perror("write"); return 1; }
        read_line(fd, line, sizeof line);
        printf("VSOCK-REPLY %s", line);
        return 0;
    }
    fprintf(stderr, "usage: vsock-echo listen PORT | connect CID PORT MSG\n");
    return 2;
}
