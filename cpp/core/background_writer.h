// Runs the writes of an output file on a second thread, in the order they were posted. Writing a chunk of a
// folded weight (the kernel copying it into the page cache) takes about as long as computing it, so with the
// writes on their own thread the next chunk is computed meanwhile: file to file costs about the larger of the
// two instead of their sum. Chunks go through a few fixed buffers, so memory stays bounded.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace qdqfold {

class BackgroundWriter {
 public:
  BackgroundWriter(size_t buffer_size, int buffers);
  // Stops the thread after the write in progress; writes still queued are dropped (the caller is unwinding).
  ~BackgroundWriter();
  BackgroundWriter(const BackgroundWriter&) = delete;
  BackgroundWriter& operator=(const BackgroundWriter&) = delete;

  // A free buffer of buffer_size bytes, once the writer is done with it. Rethrows a write's error.
  std::string& acquire();
  // Queues write(buffer) for the buffer acquire() gave; the buffer is free again after it ran.
  void post(std::string& buffer, std::function<void(const std::string&)> write);
  // Queues a write that needs no buffer (its bytes stay valid until finish()).
  void post(std::function<void()> write);
  // Waits until every queued write has run; rethrows the first error one raised.
  void finish();

 private:
  struct Job {
    std::function<void()> write;
    std::string* buffer = nullptr;  // given back to free_ after the write
  };
  void run();
  void push(Job job);
  void throw_if_failed();  // under lock_

  std::vector<std::string> buffers_;
  std::vector<std::string*> free_;
  std::deque<Job> jobs_;
  bool busy_ = false, stopping_ = false;
  std::exception_ptr error_;
  std::mutex lock_;
  std::condition_variable changed_;
  std::thread thread_;
};

}  // namespace qdqfold
