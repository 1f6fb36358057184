// ring_reader.cpp - see ring_reader.hpp.
#include "ring_reader.hpp"

#include "ring_writer.hpp"

namespace overlapd {

RingReader::RingReader(const std::string& path, int flags, int64_t stale_after_ms, int64_t spin_ns) {
  char err[512];
  if (ovl_reader_open(&r_, path.c_str(), flags, err, sizeof err) != 0)
    throw RingError(0, err[0] ? err : "cannot open the ring");
  ovl_reader_set_stale_ms(&r_, stale_after_ms);
  ovl_reader_set_spin_ns(&r_, spin_ns);
  buf_.resize(4096 / 8);  // grows on demand, up to the capacity
}

RingReader::~RingReader() { ovl_reader_close(&r_); }

int RingReader::next(int timeout_ms, ovl_event* ev) {
  for (;;) {
    int rc = ovl_reader_next(&r_, buf_.data(), buf_.size() * 8, ev, timeout_ms);
    if (rc != OVL_ERR_BUFSMALL) return rc;
    // A record is never longer than the data region; anything claiming
    // more is rejected by the reader's shape check before we get here.
    buf_.resize(ovl_align8(ev->length) / 8);
  }
}

RingReader::BenchResult RingReader::bench_consume(uint64_t count, int timeout_ms, bool verify) {
  BenchResult res;
  res.latency_ns.reserve(count < (1u << 22) ? count : (1u << 22));
  const int64_t deadline = ovl_now_ns() + static_cast<int64_t>(timeout_ms) * 1000000;
  ovl_event ev;
  while (res.received + res.lost < count) {
    const int64_t left_ms = (deadline - ovl_now_ns()) / 1000000;
    if (left_ms <= 0) break;
    const int rc = next(static_cast<int>(left_ms), &ev);
    if (rc == OVL_EV_RECORD) {
      const int64_t now = ovl_now_ns();
      res.received++;
      if (!res.first_ns) res.first_ns = now;
      res.last_ns = now;
      if (res.latency_ns.size() < (1u << 22)) res.latency_ns.push_back(now - static_cast<int64_t>(ev.publish_ns));
      if (verify) {
        const uint64_t* w = buf_.data();
        for (uint64_t i = 0; i < ev.length / 8; i++) {
          if (w[i] != RingWriter::bench_word(ev.seq, i)) {
            res.torn++;
            break;
          }
        }
      }
    } else if (rc == OVL_EV_LOST) {
      res.lost += ev.last - ev.first + 1;
    } else if (rc == OVL_EV_EPOCH) {
      res.epochs++;
    } else if (rc == OVL_EV_CLOSED) {
      res.closed = true;
      break;
    } else if (rc == OVL_EV_PRODUCER_GONE) {
      res.gone = true;
      break;
    } else if (rc == OVL_EV_TIMEOUT) {
      break;
    } else if (rc < 0 && rc != OVL_ERR_CORRUPT) {
      break;
    }
  }
  return res;
}

}  // namespace overlapd
