#include "kernels/backend.h"

namespace optd {

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    Reset();
    data_ = other.data_;
    bytes_ = other.bytes_;
    release_ = std::move(other.release_);
    other.data_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

void Buffer::Reset() {
  if (data_ != nullptr && release_) release_(data_);
  data_ = nullptr;
  bytes_ = 0;
}

}  // namespace optd
