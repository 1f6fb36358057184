/*
 * ring_tail.c - print the STEP records of an overlapd ring, using only
 * overlapd/ring.h. An example of a native consumer, and a test fixture.
 *
 *   cc -std=c11 -Wall -Werror -I kernels/include kernels/examples/ring_tail.c -o ring_tail
 *   ring_tail [--from-head] PATH COUNT
 *
 * One line per STEP record:
 *   seq=12 step=40 bsz=2 k=0 T=1 rows: 7:1012 9:88,89
 * (request_id, then the tokens the row accepted this step), and one line per
 * event: "lost first=F last=L", "epoch E", "producer gone", "producer closed".
 * Exits 0 after COUNT records (0 = no limit), a negative step id, or a clean
 * close; exits 2 with one line on stderr if PATH is not a ring.
 */
#include "overlapd/ring.h" /* first: it sets the feature macros it needs */

#include <stdlib.h>

static void print_step(const ovl_event *ev, const ovl_step *s)
{
    uint32_t i, j;
    printf("seq=%llu step=%d bsz=%u k=%u T=%u rows:", (unsigned long long)ev->seq, s->step_id,
           s->bsz, s->k, s->T);
    for (i = 0; i < s->bsz; i++) {
        printf(" %llu:", (unsigned long long)s->request_id[i]);
        for (j = 0; j < (uint32_t)s->accept_num[i]; j++)
            printf(j ? ",%d" : "%d", ovl_step_token(s, i, j, 0));
    }
    printf("\n");
}

int main(int argc, char **argv)
{
    int flags = 0, argi = 1, rc;
    unsigned long long count, seen = 0;
    char err[512];
    ovl_reader r;
    ovl_event ev;
    ovl_step s;
    size_t cap = 64 * 1024;
    void *buf;

    if (argi < argc && strcmp(argv[argi], "--from-head") == 0) {
        flags |= OVL_FROM_HEAD;
        argi++;
    }
    if (argc - argi != 2) {
        fprintf(stderr, "usage: ring_tail [--from-head] PATH COUNT\n");
        return 2;
    }
    count = strtoull(argv[argi + 1], NULL, 10);
    if (ovl_reader_open(&r, argv[argi], flags, err, sizeof err) != 0) {
        fprintf(stderr, "ring_tail: %s\n", err);
        return 2;
    }
    fprintf(stderr, "ring_tail: reading %s (epoch %llu, capacity %llu)\n", argv[argi],
            (unsigned long long)r.epoch, (unsigned long long)r.capacity);
    buf = malloc(cap); /* malloc is 16-aligned: STEP bodies need 8 */
    if (!buf) return 3;

    for (;;) {
        rc = ovl_reader_next(&r, buf, cap, &ev, -1);
        if (rc == OVL_EV_RECORD) {
            if (ev.type != OVL_TYPE_STEP) continue;
            if ((rc = ovl_step_parse(buf, ev.length, &s)) != 0) {
                printf("seq=%llu bad STEP body: %s\n", (unsigned long long)ev.seq, ovl_strerror(rc));
            } else {
                print_step(&ev, &s);
                seen++;
                if (s.step_id < 0 || (count && seen >= count)) break;
            }
        } else if (rc == OVL_ERR_BUFSMALL) {
            void *bigger = ev.length <= r.capacity ? realloc(buf, (size_t)ev.length) : NULL;
            if (!bigger) {
                fprintf(stderr, "ring_tail: record of %llu bytes does not fit\n", (unsigned long long)ev.length);
                break;
            }
            buf = bigger;
            cap = (size_t)ev.length;
        } else if (rc == OVL_EV_LOST) {
            printf("lost first=%llu last=%llu\n", (unsigned long long)ev.first, (unsigned long long)ev.last);
        } else if (rc == OVL_EV_EPOCH) {
            printf("epoch %llu\n", (unsigned long long)ev.epoch);
        } else if (rc == OVL_EV_PRODUCER_GONE) {
            printf("producer gone\n");
        } else if (rc == OVL_EV_CLOSED) {
            printf("producer closed\n");
            break;
        } else if (rc < 0) {
            fprintf(stderr, "ring_tail: %s\n", ovl_strerror(rc));
        }
        fflush(stdout);
    }
    fflush(stdout);
    free(buf);
    ovl_reader_close(&r);
    return 0;
}
