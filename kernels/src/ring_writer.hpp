// ring_writer.hpp - the producer side of the shared-memory ring (SPEC.md 1).
//
// One RingWriter per ring file and process; it is not thread-safe (the
// Python binding serialises calls). Layout constants come from
// overlapd/ring.h so reader and writer cannot disagree.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

namespace overlapd {

// A file-level failure (open, map, a ring owned by someone else). errno_value
// is 0 when the failure is not an OS error.
class RingError : public std::runtime_error {
 public:
  RingError(int errno_value, const std::string& what)
      : std::runtime_error(what), errno_value_(errno_value) {}
  int errno_value() const { return errno_value_; }

 private:
  int errno_value_;
};

// An mmap'd region that unmaps itself when the last owner lets go. Views
// handed to Python hold a reference, so a memoryview kept past close() can
// never point at unmapped memory.
struct Mapping {
  uint8_t* base = nullptr;
  size_t len = 0;
  Mapping(uint8_t* b, size_t l) : base(b), len(l) {}
  ~Mapping();
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
};

class RingWriter {
 public:
  // Creates or re-creates the ring at path. capacity: data bytes, a power of
  // two >= 65536. mode: file permission bits, applied exactly (not umask'd).
  // Throws std::invalid_argument for bad arguments and RingError when
  // the file cannot be set up or a live producer (another process with a
  // fresh heartbeat, or another open writer in this process) owns it.
  RingWriter(const std::string& path, uint64_t capacity, uint32_t max_slots, uint32_t vocab_size,
             const std::string& model_name, uint32_t mode, bool backpressure);
  ~RingWriter();
  RingWriter(const RingWriter&) = delete;
  RingWriter& operator=(const RingWriter&) = delete;

  // Opens a reservation for a STEP record with a body of body_len bytes and
  // returns where the body goes (align8(body_len) writable bytes, the pad
  // already zeroed), or nullptr when backpressure forbids overwriting yet.
  // Throws std::invalid_argument when the record exceeds max_record_bytes(),
  // std::logic_error when a reservation is open or the writer is closed.
  uint8_t* try_reserve(size_t body_len);
  // Publishes the open reservation; returns its seq.
  uint64_t commit();
  // Drops the open reservation (the caller failed to fill it). Nothing is
  // published; readers never see the bytes.
  void cancel();
  bool reservation_open() const { return res_len_ != 0; }
  size_t reservation_body_len() const { return res_len_ ? res_len_ - kRecHeader : 0; }

  // reserve + copy + commit; returns the seq, or -1 when backpressure blocks.
  int64_t publish(const void* body, size_t len);
  void heartbeat();
  // Frees backpressure slots whose pid is gone; returns how many.
  int evict_dead_readers();
  // Slots of dead readers this writer freed, here or on its own while
  // checking who holds the producer back.
  uint64_t readers_evicted() const { return readers_evicted_; }
  int active_readers() const;
  // Final heartbeat, flag bit 0 if clean, then unmap. Idempotent.
  void close(bool clean = true);
  bool closed() const { return map_ == nullptr; }

  // Benchmark/test loop: publishes count records of body_len bytes whose
  // body words are bench_word(seq, i), pacing by busy-waiting interval_ns
  // between records. While backpressure blocks it retries; it gives up once
  // stop_after_ns (if nonzero) have passed since the call began. Returns
  // how many records were published.
  uint64_t bench_publish(uint64_t count, size_t body_len, uint64_t interval_ns,
                         uint64_t stop_after_ns);
  static uint64_t bench_word(uint64_t seq, uint64_t i) {
    return (seq + 1) * 0x9E3779B97F4A7C15ull ^ (i + 1) * 0xC2B2AE3D27D4EB4Full;
  }

  const std::string& path() const { return path_; }
  uint64_t capacity() const { return capacity_; }
  uint64_t epoch() const { return epoch_; }
  uint64_t head() const { return head_; }
  uint64_t tail() const { return tail_; }
  uint64_t next_seq() const { return next_seq_; }
  // Largest whole record (header included): half the data region, so a
  // record plus the PAD before it never exceeds the capacity.
  uint64_t max_record_bytes() const { return max_record_; }
  // The mapping, for views that must outlive close().
  std::shared_ptr<Mapping> mapping() const { return map_; }

  static constexpr size_t kRecHeader = 24;

 private:
  void create_new_file(uint32_t mode);
  void reinit_in_place(int fd);
  void write_header(uint8_t* base, bool in_place);
  bool backpressure_allows(uint64_t new_intent);
  bool slot_alive_or_free(int i);
  void advance_head(uint64_t new_intent);
  void write_pad(uint64_t pos, uint64_t len);
  uint8_t* data(uint64_t pos) const;
  void wake_readers();

  std::string path_;
  std::string model_name_;
  uint64_t capacity_ = 0;
  uint64_t max_record_ = 0;
  uint32_t max_slots_ = 0;
  uint32_t vocab_size_ = 0;
  bool backpressure_ = false;

  std::shared_ptr<Mapping> map_;
  uint8_t* base_ = nullptr;
  uint64_t dev_ = 0, ino_ = 0;
  uint64_t epoch_ = 0;

  // Producer-private copies of the shared positions (only we store them).
  uint64_t head_ = 0;
  uint64_t tail_ = 0;
  uint64_t intent_ = 0;  // highest tail_intent ever stored: it never moves back
  uint64_t next_seq_ = 0;

  // Open reservation: the record (after any PAD) starts at res_pos_.
  uint64_t res_pos_ = 0;
  uint64_t res_end_ = 0;  // tail after commit
  size_t res_len_ = 0;    // whole record length; 0 when none is open

  // Lower bound of every active reader's cursor as of the last scan (see
  // backpressure_allows): lets the common case skip scanning 64 slots.
  uint64_t bp_min_cursor_ = 0;
  uint64_t readers_evicted_ = 0;
};

}  // namespace overlapd
