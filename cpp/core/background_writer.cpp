#include "background_writer.h"

namespace qdqfold {

BackgroundWriter::BackgroundWriter(size_t buffer_size, int buffers) : buffers_(static_cast<size_t>(buffers)) {
  for (auto& b : buffers_) {
    b.resize(buffer_size);
    free_.push_back(&b);
  }
  thread_ = std::thread([this] { run(); });
}

BackgroundWriter::~BackgroundWriter() {
  {
    std::lock_guard<std::mutex> hold(lock_);
    stopping_ = true;
    jobs_.clear();
  }
  changed_.notify_all();
  thread_.join();
}

void BackgroundWriter::throw_if_failed() {
  if (error_) std::rethrow_exception(error_);
}

std::string& BackgroundWriter::acquire() {
  std::unique_lock<std::mutex> hold(lock_);
  changed_.wait(hold, [&] { return !free_.empty() || error_; });
  throw_if_failed();
  std::string* b = free_.back();
  free_.pop_back();
  return *b;
}

void BackgroundWriter::push(Job job) {
  {
    std::lock_guard<std::mutex> hold(lock_);
    throw_if_failed();
    jobs_.push_back(std::move(job));
  }
  changed_.notify_all();
}

void BackgroundWriter::post(std::string& buffer, std::function<void(const std::string&)> write) {
  push(Job{[&buffer, write = std::move(write)] { write(buffer); }, &buffer});
}

void BackgroundWriter::post(std::function<void()> write) { push(Job{std::move(write), nullptr}); }

void BackgroundWriter::finish() {
  std::unique_lock<std::mutex> hold(lock_);
  changed_.wait(hold, [&] { return (jobs_.empty() && !busy_) || error_; });
  throw_if_failed();
}

void BackgroundWriter::run() {
  std::unique_lock<std::mutex> hold(lock_);
  for (;;) {
    changed_.wait(hold, [&] { return stopping_ || !jobs_.empty(); });
    if (stopping_) return;
    Job job = std::move(jobs_.front());
    jobs_.pop_front();
    busy_ = true;
    hold.unlock();
    std::exception_ptr failed;
    try {
      if (!error_) job.write();  // after a failure the rest is skipped: the output is abandoned
    } catch (...) {
      failed = std::current_exception();
    }
    hold.lock();
    busy_ = false;
    if (failed && !error_) error_ = failed;
    if (job.buffer) free_.push_back(job.buffer);
    changed_.notify_all();
  }
}

}  // namespace qdqfold
