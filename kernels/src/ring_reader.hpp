// ring_reader.hpp - a C++ owner for the C reader of overlapd/ring.h.
//
// Adds what a binding needs and the C API leaves to its caller: a record
// buffer that grows on OVL_ERR_BUFSMALL (never past the ring's capacity) and
// the native consume loop used by benchmarks and tests. Not thread-safe;
// the binding serialises calls (interrupt() is the exception).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "overlapd/ring.h"

namespace overlapd {

class RingReader {
 public:
  // flags: OVL_FROM_HEAD, OVL_BACKPRESSURE, OVL_STRICT_RDONLY. Throws
  // RingError (ring_writer.hpp) with the reader's sentence on failure.
  RingReader(const std::string& path, int flags, int64_t stale_after_ms, int64_t spin_ns = OVL_SPIN_NS);
  ~RingReader();
  RingReader(const RingReader&) = delete;
  RingReader& operator=(const RingReader&) = delete;

  // ovl_reader_next, retrying with a bigger buffer when a record does not
  // fit. On OVL_EV_RECORD the body is at body(), ev->length bytes.
  int next(int timeout_ms, ovl_event* ev);
  const uint8_t* body() const { return reinterpret_cast<const uint8_t*>(buf_.data()); }

  void close() { ovl_reader_close(&r_); }
  bool is_open() const { return r_.base != nullptr; }
  // Safe from another thread: makes a blocked next() return TIMEOUT soon.
  void interrupt() { ovl_reader_interrupt(&r_); }
  const ovl_reader& raw() const { return r_; }

  struct BenchResult {
    uint64_t received = 0, lost = 0, torn = 0, epochs = 0;
    bool closed = false, gone = false;
    int64_t first_ns = 0, last_ns = 0;  // CLOCK_MONOTONIC at the first and last receipt
    std::vector<int64_t> latency_ns;  // receipt time - publish_ns, per record
  };
  // Reads until count records were received or lost, the producer closed or
  // died, or timeout_ms passed. verify checks each body against
  // RingWriter::bench_word (a torn copy would mix two records' words).
  BenchResult bench_consume(uint64_t count, int timeout_ms, bool verify);

 private:
  ovl_reader r_;
  std::vector<uint64_t> buf_;  // uint64_t: STEP bodies need 8-byte alignment
};

}  // namespace overlapd
