/* chat_load.py in C: the same load, the same protocol with the parent, a
 * fraction of the CPU per delivery.
 *
 * Why: on a 2-core machine the load generators share the cores with the
 * servers they measure. chat_load.py spends a few microseconds of Python per
 * line it receives, which at a million deliveries a second is most of a core:
 * the generators, not the servers, then set the rate, and a setup that costs
 * the servers more CPU looks slower only because it takes CPU the generators
 * needed. This one reads and scans lines in C (scripts/bench/pingpong.c is the
 * same idea for the echo benchmarks).
 *
 * Behaviour, flags, stdin/stdout protocol and the latency files are those of
 * chat_load.py (read its docstring): connect and /nick every client, print
 * "ready", wait for "go", run, print one JSON line; each sender keeps at most
 * --window of its own messages in flight, a message being in flight until
 * every client of this process has received it.
 *
 *   cc -O2 -o chat_load chat_load.c
 *   ./chat_load --port P --first N --count N --all-senders N --latencies FILE
 *               [--messages 200] [--window 16] [--timeout 60] [--senders I ...]
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CLIENTS 4096
#define LINE_MAX_BYTES 4096

typedef struct {
    int fd;
    int index;             /* the client's global index (its nick is c%03d) */
    char rest[LINE_MAX_BYTES];  /* a line's beginning, its end not received yet */
    size_t rest_len;
} client_t;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static double cpu_seconds(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec +
           r.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

/* A growable int64 array (the latencies). */
typedef struct {
    int64_t *v;
    size_t n, cap;
} vec_t;

static void push(vec_t *a, int64_t x) {
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 1 << 16;
        a->v = realloc(a->v, a->cap * sizeof *a->v);
        if (!a->v) die("realloc");
    }
    a->v[a->n++] = x;
}

static void write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t k = write(fd, p, n);
        if (k < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;  /* (blocking socket) */
            die("write");
        }
        p += k;
        n -= (size_t)k;
    }
}

static void save(const char *path, const vec_t *a) {
    FILE *f = fopen(path, "wb");
    if (!f) die(path);
    if (a->n && fwrite(a->v, sizeof *a->v, a->n, f) != a->n) die(path);
    fclose(f);
}

/* Parse a non-negative decimal at p (stops at the first non-digit). */
static int64_t number(const char **p, const char *end) {
    int64_t x = 0;
    while (*p < end && **p >= '0' && **p <= '9') x = x * 10 + (*(*p)++ - '0');
    return x;
}

int main(int argc, char **argv) {
    int port = 0, first = -1, count = -1, all_senders = -1, messages = 200, window = 16;
    double timeout = 60.0;
    const char *latencies = NULL;
    int senders_arg[MAX_CLIENTS];
    int n_senders_arg = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--senders")) {
            while (i + 1 < argc && argv[i + 1][0] != '-' && n_senders_arg < MAX_CLIENTS)
                senders_arg[n_senders_arg++] = atoi(argv[++i]);
            continue;
        }
        if (!v) {
            fprintf(stderr, "chat_load: %s needs a value\n", a);
            return 2;
        }
        if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--first")) first = atoi(v);
        else if (!strcmp(a, "--count")) count = atoi(v);
        else if (!strcmp(a, "--all-senders")) all_senders = atoi(v);
        else if (!strcmp(a, "--messages")) messages = atoi(v);
        else if (!strcmp(a, "--window")) window = atoi(v);
        else if (!strcmp(a, "--timeout")) timeout = atof(v);
        else if (!strcmp(a, "--latencies")) latencies = v;
        else {
            fprintf(stderr, "chat_load: unknown option %s\n", a);
            return 2;
        }
        i++;
    }
    if (!port || first < 0 || count < 1 || count > MAX_CLIENTS || all_senders < 0 || !latencies) {
        fprintf(stderr, "chat_load: --port, --first, --count (1..%d), --all-senders and "
                        "--latencies are required\n", MAX_CLIENTS);
        return 2;
    }

    static client_t clients[MAX_CLIENTS];
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int k = 0; k < count; k++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) die("socket");
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        char nick[32];
        int n = snprintf(nick, sizeof nick, "/nick c%03d\n", first + k);
        write_all(fd, nick, (size_t)n);
        clients[k].fd = fd;
        clients[k].index = first + k;
    }
    /* Wait for every "OK nick" (blocking, before the run), as chat_load.py does. */
    for (int k = 0; k < count; k++) {
        struct timeval tv = {.tv_sec = 10};
        setsockopt(clients[k].fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        char buf[65536];
        size_t have = 0;
        for (;;) {
            ssize_t r = recv(clients[k].fd, buf + have, sizeof buf - 1 - have, 0);
            if (r <= 0) {
                fprintf(stderr, "chat_load: client %d closed or timed out while joining\n",
                        clients[k].index);
                return 1;
            }
            have += (size_t)r;
            buf[have] = 0;
            if (strstr(buf, "OK nick")) break;
            if (have > sizeof buf / 2) {  /* keep the tail: the reply may straddle */
                memmove(buf, buf + have - 64, 64);
                have = 64;
            }
        }
    }
    printf("ready\n");
    fflush(stdout);
    char go[16];
    if (!fgets(go, sizeof go, stdin) || strncmp(go, "go", 2)) return 1;

    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    for (int k = 0; k < count; k++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)k};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, clients[k].fd, &ev) < 0) die("epoll_ctl");
    }
    /* Local senders: (global index - first) -> slot; their sent/acked counts
     * and, per message, how many of this process's clients have received it. */
    static int slot_of[MAX_CLIENTS];
    for (int k = 0; k < MAX_CLIENTS; k++) slot_of[k] = -1;
    static int local[MAX_CLIENTS];
    int n_local = 0;
    for (int j = 0; j < n_senders_arg; j++) {
        int s = senders_arg[j];
        if (s >= first && s < first + count && slot_of[s - first] < 0) {
            slot_of[s - first] = n_local;
            local[n_local++] = s;
        }
    }
    int *sent = calloc((size_t)n_local + 1, sizeof(int));
    int *acked = calloc((size_t)n_local + 1, sizeof(int));
    int *got = calloc((size_t)(n_local + 1) * (size_t)messages, sizeof(int));
    if (!sent || !acked || !got) die("calloc");
    int local_recipients = count - 1;
    int64_t expected = 0;
    for (int k = 0; k < count; k++)
        expected += (int64_t)all_senders * messages - (slot_of[k] >= 0 ? messages : 0);
    int64_t received = 0;
    vec_t lat = {0}, lat_other = {0};
    double cpu0 = cpu_seconds();
    int64_t start = now_ns();
    int64_t deadline = start + (int64_t)(timeout * 1e9);
    int64_t last = start;
    static char out[1 << 16];
    static char buf[1 << 18];
    struct epoll_event events[256];

    for (;;) {
        /* pump the senders: fill each one's window */
        for (int j = 0; j < n_local; j++) {
            int n = window - (sent[j] - acked[j]);
            if (n > messages - sent[j]) n = messages - sent[j];
            /* what fits in `out` (a line is at most 43 bytes); the rest next pass */
            if (n > (int)(sizeof out / 48)) n = (int)(sizeof out / 48);
            if (n <= 0) continue;
            int64_t t = now_ns();
            size_t len = 0;
            for (int q = 0; q < n; q++)
                len += (size_t)snprintf(out + len, sizeof out - len, "%d %d %lld\n", local[j],
                                        sent[j] + q, (long long)t);
            /* small: the kernel takes it at once (blocking send, as chat_load.py) */
            int fd = clients[local[j] - first].fd;
            size_t off = 0;
            while (off < len) {
                ssize_t w = send(fd, out + off, len - off, 0);
                if (w < 0) {
                    if (errno == EAGAIN || errno == EINTR) continue;
                    die("send");
                }
                off += (size_t)w;
            }
            sent[j] += n;
        }
        if (received >= expected || now_ns() >= deadline) break;
        int nev = epoll_wait(ep, events, 256, 1000);
        int64_t now = now_ns();
        for (int e = 0; e < nev; e++) {
            client_t *c = &clients[events[e].data.u32];
            ssize_t r = recv(c->fd, buf + c->rest_len, sizeof buf - c->rest_len, MSG_DONTWAIT);
            if (r < 0) {
                if (errno == EAGAIN || errno == EINTR) continue;
                die("recv");
            }
            if (r == 0) {
                fprintf(stderr, "chat_load: client %d: server closed the connection\n", c->index);
                return 1;
            }
            /* the previous call's partial line goes first */
            memcpy(buf, c->rest, c->rest_len);
            const char *p = buf, *end = buf + c->rest_len + r;
            for (;;) {
                const char *nl = memchr(p, '\n', (size_t)(end - p));
                if (!nl) break;
                if (nl - p > 4 && !memcmp(p, "MSG ", 4)) {
                    /* MSG <nick> <sender> <seq> <sent ns> */
                    const char *f = memchr(p + 4, ' ', (size_t)(nl - p - 4));
                    if (f) {
                        f++;
                        int s = (int)number(&f, nl);
                        f++;
                        int q = (int)number(&f, nl);
                        f++;
                        int64_t t = number(&f, nl);
                        push(&lat, now - t);
                        received++;
                        int slot = s >= first && s < first + count ? slot_of[s - first] : -1;
                        if (slot < 0) {
                            push(&lat_other, now - t);
                        } else if (q >= 0 && q < messages) {
                            if (++got[(size_t)slot * messages + q] == local_recipients) acked[slot]++;
                        }
                    }
                }
                p = nl + 1;
            }
            c->rest_len = (size_t)(end - p);
            if (c->rest_len > LINE_MAX_BYTES) {
                fprintf(stderr, "chat_load: client %d: a line over %d bytes\n", c->index,
                        LINE_MAX_BYTES);
                return 1;
            }
            memcpy(c->rest, p, c->rest_len);
            last = now;
        }
    }
    double cpu = cpu_seconds() - cpu0;
    for (int k = 0; k < count; k++) close(clients[k].fd);
    save(latencies, &lat);
    char other[4096];
    snprintf(other, sizeof other, "%s.other", latencies);
    save(other, &lat_other);
    printf("{\"received\": %lld, \"expected\": %lld, \"start_ns\": %lld, \"last_ns\": %lld, "
           "\"cpu_s\": %.6f}\n",
           (long long)received, (long long)expected, (long long)start, (long long)last, cpu);
    fflush(stdout);
    return 0;
}
