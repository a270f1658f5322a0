/* A lean ping-pong load generator for scripts/bench/workers.py (and anyone).
 *
 * Opens CONNS connections to 127.0.0.1:PORT, keeps one SIZE-byte message in
 * flight on each, and counts complete round trips for SECONDS after a warm-up
 * of WARMUP seconds. Prints: "<round trips/s> <cpu seconds used by this process>".
 * Written in C so that the load generator costs a few microseconds per round
 * trip: on a 2-core machine it shares the cores with the servers it measures.
 *
 *   cc -O2 -o pingpong pingpong.c && ./pingpong PORT [CONNS SIZE SECONDS WARMUP]
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PORT [CONNS SIZE SECONDS WARMUP]\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    int conns = argc > 2 ? atoi(argv[2]) : 100;
    int size = argc > 3 ? atoi(argv[3]) : 64;
    double seconds = argc > 4 ? atof(argv[4]) : 3.0;
    double warmup = argc > 5 ? atof(argv[5]) : 0.5;
    char *msg = malloc(size), buf[65536];
    memset(msg, 'm', size);
    int *pending = calloc(conns, sizeof(int));
    int *fds = calloc(conns, sizeof(int));
    int ep = epoll_create1(0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    for (int i = 0; i < conns; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
            perror("connect");
            return 1;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        fds[i] = fd;
        if (write(fd, msg, size) != size) return 1;
        pending[i] = size;
    }
    struct epoll_event events[256];
    long count = 0;
    double start = now(), counting_from = start + warmup, end = counting_from + seconds;
    double cpu_start = 0;
    int counting = 0;
    for (;;) {
        double t = now();
        if (t >= end) break;
        if (!counting && t >= counting_from) {
            counting = 1;
            count = 0;
            cpu_start = cpu();
        }
        int n = epoll_wait(ep, events, 256, 200);
        for (int k = 0; k < n; k++) {
            int i = events[k].data.u32;
            ssize_t got = read(fds[i], buf, sizeof buf);
            if (got <= 0) {
                fprintf(stderr, "server closed a connection\n");
                return 1;
            }
            pending[i] -= got;
            if (pending[i] == 0) {
                count++;
                if (write(fds[i], msg, size) != size) return 1;
                pending[i] = size;
            }
        }
    }
    printf("%.1f %.3f\n", count / seconds, cpu() - cpu_start);
    return 0;
}
