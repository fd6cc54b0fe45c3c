/*
 * fsam_sub: a minimal C subscriber to the fluorosam-rt mask stream (protocol versions 1 and 2).
 *
 * It exists to prove the wire protocol is language-neutral: it uses only libzmq and a
 * self-contained msgpack reader (the header needs a handful of types), and prints for every
 * message the same line as `fluorosam-rt bridge listen`:
 *
 *     frame <frame_id> seq <seq> prompts <K> sums <s0> <s1> ... [tips <p>:<id>:<x>,<y> ...]
 *
 * where s_i is the number of mask pixels set for prompt i ("-" in a geometry-only message, which
 * has no mask planes), and each tool tip (version 2) is given by its prompt's index, its
 * instance's tracked id and its position in source pixels. See docs/protocol.md.
 *
 * Build: cc -O2 -o fsam_sub fsam_sub.c -lzmq
 * Run:   ./fsam_sub ENDPOINT [TOPIC] [COUNT]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#define MAX_PARTS 300

typedef struct {
    const uint8_t *p, *end;
    int err;
} reader;

static uint64_t be(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

static const uint8_t *take(reader *r, size_t n) {
    if (r->err || (size_t)(r->end - r->p) < n) { r->err = 1; return NULL; }
    const uint8_t *q = r->p;
    r->p += n;
    return q;
}

/* Reads one integer (any msgpack int format); sets err for anything else. */
static int64_t read_int(reader *r) {
    const uint8_t *t = take(r, 1);
    if (!t) return 0;
    uint8_t c = *t;
    if (c <= 0x7f) return c;
    if (c >= 0xe0) return (int8_t)c;
    static const int sizes[] = {1, 2, 4, 8};
    if (c >= 0xcc && c <= 0xcf) { const uint8_t *q = take(r, sizes[c - 0xcc]); return q ? (int64_t)be(q, sizes[c - 0xcc]) : 0; }
    if (c >= 0xd0 && c <= 0xd3) {
        int n = sizes[c - 0xd0];
        const uint8_t *q = take(r, n);
        if (!q) return 0;
        uint64_t v = be(q, n);
        if (n < 8 && (v >> (8 * n - 1))) v |= ~0ULL << (8 * n); /* sign-extend */
        return (int64_t)v;
    }
    r->err = 1;
    return 0;
}

/* Reads a number (any msgpack int or float format); sets err for anything else. */
static double read_num(reader *r) {
    if (r->err || r->p >= r->end) { r->err = 1; return 0; }
    uint8_t c = *r->p;
    if (c == 0xca || c == 0xcb) {
        r->p++;
        const uint8_t *q = take(r, c == 0xca ? 4 : 8);
        if (!q) return 0;
        if (c == 0xca) { uint32_t u = (uint32_t)be(q, 4); float f; memcpy(&f, &u, 4); return f; }
        uint64_t u = be(q, 8); double d; memcpy(&d, &u, 8); return d;
    }
    return (double)read_int(r);
}

/* Reads a string header; returns its bytes (not NUL-terminated) and length. */
static const uint8_t *read_str(reader *r, uint32_t *len) {
    const uint8_t *t = take(r, 1);
    if (!t) return NULL;
    uint8_t c = *t;
    uint32_t n;
    if ((c & 0xe0) == 0xa0) n = c & 0x1f;
    else if (c == 0xd9) { const uint8_t *q = take(r, 1); n = q ? q[0] : 0; }
    else if (c == 0xda) { const uint8_t *q = take(r, 2); n = q ? (uint32_t)be(q, 2) : 0; }
    else if (c == 0xdb) { const uint8_t *q = take(r, 4); n = q ? (uint32_t)be(q, 4) : 0; }
    else { r->err = 1; return NULL; }
    *len = n;
    return take(r, n);
}

/* Container headers: returns the element count, or -1 when the next object is not that kind. */
static int64_t read_container(reader *r, int want_map) {
    const uint8_t *t = take(r, 1);
    if (!t) return -1;
    uint8_t c = *t;
    if (want_map && (c & 0xf0) == 0x80) return c & 0x0f;
    if (!want_map && (c & 0xf0) == 0x90) return c & 0x0f;
    if (c == (want_map ? 0xde : 0xdc)) { const uint8_t *q = take(r, 2); return q ? (int64_t)be(q, 2) : -1; }
    if (c == (want_map ? 0xdf : 0xdd)) { const uint8_t *q = take(r, 4); return q ? (int64_t)be(q, 4) : -1; }
    r->err = 1;
    return -1;
}

/* Skips one object of any type (depth-limited so a hostile header cannot blow the stack). */
static void skip(reader *r, int depth) {
    if (depth > 32) { r->err = 1; return; }
    const uint8_t *t = take(r, 1);
    if (!t) return;
    uint8_t c = *t;
    uint64_t n = 0;
    if (c <= 0x7f || c >= 0xe0 || c == 0xc0 || c == 0xc2 || c == 0xc3) return;
    if ((c & 0xe0) == 0xa0) { take(r, c & 0x1f); return; }
    if ((c & 0xf0) == 0x90 || (c & 0xf0) == 0x80) {
        n = (c & 0x0f) * ((c & 0xf0) == 0x80 ? 2 : 1);
        for (uint64_t i = 0; i < n && !r->err; i++) skip(r, depth + 1);
        return;
    }
    switch (c) {
    case 0xcc: case 0xd0: take(r, 1); return;
    case 0xcd: case 0xd1: take(r, 2); return;
    case 0xce: case 0xd2: case 0xca: take(r, 4); return;
    case 0xcf: case 0xd3: case 0xcb: take(r, 8); return;
    case 0xd9: case 0xc4: { const uint8_t *q = take(r, 1); if (q) take(r, q[0]); return; }
    case 0xda: case 0xc5: { const uint8_t *q = take(r, 2); if (q) take(r, be(q, 2)); return; }
    case 0xdb: case 0xc6: { const uint8_t *q = take(r, 4); if (q) take(r, be(q, 4)); return; }
    case 0xdc: case 0xde: { const uint8_t *q = take(r, 2); if (q) n = be(q, 2); break; }
    case 0xdd: case 0xdf: { const uint8_t *q = take(r, 4); if (q) n = be(q, 4); break; }
    default: r->err = 1; return; /* ext types are not used by the protocol */
    }
    if (c == 0xde || c == 0xdf) n *= 2;
    for (uint64_t i = 0; i < n && !r->err; i++) skip(r, depth + 1);
}

static int key_is(const uint8_t *k, uint32_t n, const char *want) {
    return k && n == strlen(want) && memcmp(k, want, n) == 0;
}

#define MAX_TIPS 1024

typedef struct {
    int64_t prompt, id;
    double x, y;
} tip;

typedef struct {
    int64_t version, frame_id, seq, height, width, n_prompts;
    int bits;   /* 1: "bits" encoding, 0: "u8" */
    int planes; /* 0: geometry-only message (version 2), no mask parts */
    int n_tips;
    tip tips[MAX_TIPS];
} header;

/* One instance map of a version-2 prompt entry: its id and, for a tool, its tip. */
static void parse_instance(reader *r, header *h, int64_t prompt) {
    int64_t n = read_container(r, 1), id = -1;
    double x = 0, y = 0;
    int has_tip = 0;
    for (int64_t i = 0; i < n && !r->err; i++) {
        uint32_t kl = 0;
        const uint8_t *k = read_str(r, &kl);
        if (key_is(k, kl, "id")) id = read_int(r);
        else if (key_is(k, kl, "tip")) {
            if (read_container(r, 0) != 2) { r->err = 1; return; }
            x = read_num(r);
            y = read_num(r);
            has_tip = 1;
        } else skip(r, 2);
    }
    if (has_tip && !r->err && h->n_tips < MAX_TIPS) h->tips[h->n_tips++] = (tip){prompt, id, x, y};
}

/* One prompt entry: only "instances" matters here. */
static void parse_prompt(reader *r, header *h, int64_t prompt) {
    int64_t n = read_container(r, 1);
    for (int64_t i = 0; i < n && !r->err; i++) {
        uint32_t kl = 0;
        const uint8_t *k = read_str(r, &kl);
        if (key_is(k, kl, "instances")) {
            int64_t m = read_container(r, 0);
            for (int64_t j = 0; j < m && !r->err; j++) parse_instance(r, h, prompt);
        } else skip(r, 1);
    }
}

static int parse_header(const uint8_t *buf, size_t len, header *h) {
    reader r = {buf, buf + len, 0};
    memset(h, 0, sizeof *h);
    h->version = -1;
    h->n_prompts = -1;
    h->planes = 1;
    int64_t n = read_container(&r, 1);
    for (int64_t i = 0; i < n && !r.err; i++) {
        uint32_t kl = 0;
        const uint8_t *k = read_str(&r, &kl);
        if (key_is(k, kl, "v")) h->version = read_int(&r);
        else if (key_is(k, kl, "frame_id")) h->frame_id = read_int(&r);
        else if (key_is(k, kl, "seq")) h->seq = read_int(&r);
        else if (key_is(k, kl, "prompts")) { h->n_prompts = read_container(&r, 0); for (int64_t j = 0; j < h->n_prompts && !r.err; j++) parse_prompt(&r, h, j); }
        else if (key_is(k, kl, "mask")) {
            int64_t m = read_container(&r, 1);
            for (int64_t j = 0; j < m && !r.err; j++) {
                uint32_t ml = 0;
                const uint8_t *mk = read_str(&r, &ml);
                if (key_is(mk, ml, "height")) h->height = read_int(&r);
                else if (key_is(mk, ml, "width")) h->width = read_int(&r);
                else if (key_is(mk, ml, "encoding")) { uint32_t el = 0; const uint8_t *e = read_str(&r, &el); h->bits = key_is(e, el, "bits"); }
                else if (key_is(mk, ml, "planes")) { const uint8_t *b = take(&r, 1); if (b && (*b == 0xc2 || *b == 0xc3)) h->planes = *b == 0xc3; else r.err = 1; }
                else skip(&r, 1);
            }
        } else skip(&r, 0);
    }
    if (r.err || n < 0) return -1;
    return 0;
}

static uint64_t mask_sum(const uint8_t *p, size_t len, int bits) {
    uint64_t s = 0;
    for (size_t i = 0; i < len; i++) s += bits ? (uint64_t)__builtin_popcount(p[i]) : (p[i] != 0);
    return s;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s ENDPOINT [TOPIC] [COUNT]\n", argv[0]); return 2; }
    const char *topic = argc > 2 ? argv[2] : "";
    long count = argc > 3 ? atol(argv[3]) : -1;
    void *ctx = zmq_ctx_new();
    void *sub = zmq_socket(ctx, ZMQ_SUB);
    int hwm = 1000, linger = 0;
    zmq_setsockopt(sub, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(sub, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(sub, ZMQ_SUBSCRIBE, topic, strlen(topic));
    if (zmq_connect(sub, argv[1]) != 0) { fprintf(stderr, "connect %s: %s\n", argv[1], zmq_strerror(zmq_errno())); return 2; }
    printf("ready\n");
    fflush(stdout);
    zmq_msg_t parts[MAX_PARTS];
    int rc = 0;
    for (long got = 0; count < 0 || got < count; got++) {
        int np = 0, more = 1;
        while (more) {
            zmq_msg_t *m = &parts[np < MAX_PARTS ? np : MAX_PARTS - 1];
            if (np >= MAX_PARTS) zmq_msg_close(m);
            zmq_msg_init(m);
            if (zmq_msg_recv(m, sub, 0) < 0) { fprintf(stderr, "recv: %s\n", zmq_strerror(zmq_errno())); rc = 1; goto done; }
            more = zmq_msg_more(m);
            np++;
        }
        if (np > MAX_PARTS) { fprintf(stderr, "message with %d parts rejected\n", np); rc = 3; goto done; }
        header h;
        if (np < 2 || parse_header(zmq_msg_data(&parts[1]), zmq_msg_size(&parts[1]), &h) != 0) {
            fprintf(stderr, "malformed header\n"); rc = 3; goto close;
        }
        if (h.version != 1 && h.version != 2) { fprintf(stderr, "protocol version %lld, this subscriber speaks 1 and 2\n", (long long)h.version); rc = 4; goto close; }
        if (h.n_prompts < 0 || np < 2 + (h.planes ? h.n_prompts : 0)) { fprintf(stderr, "part count does not match the header\n"); rc = 3; goto close; }
        size_t want = h.bits ? (size_t)((h.height * h.width + 7) / 8) : (size_t)(h.height * h.width);
        printf("frame %lld seq %lld prompts %lld sums", (long long)h.frame_id, (long long)h.seq, (long long)h.n_prompts);
        for (int64_t i = 0; i < h.n_prompts; i++) {
            if (!h.planes) { printf(" -"); continue; }
            zmq_msg_t *m = &parts[2 + i];
            if (zmq_msg_size(m) != want) { fprintf(stderr, "\nmask %lld has %zu bytes, expected %zu\n", (long long)i, zmq_msg_size(m), want); rc = 3; goto close; }
            printf(" %llu", (unsigned long long)mask_sum(zmq_msg_data(m), want, h.bits));
        }
        if (h.n_tips) printf(" tips");
        for (int i = 0; i < h.n_tips; i++)
            printf(" %lld:%lld:%.2f,%.2f", (long long)h.tips[i].prompt, (long long)h.tips[i].id, h.tips[i].x, h.tips[i].y);
        printf("\n");
        fflush(stdout);
    close:
        for (int i = 0; i < np; i++) zmq_msg_close(&parts[i]);
        if (rc) goto done;
    }
done:
    zmq_close(sub);
    zmq_ctx_term(ctx);
    return rc;
}
