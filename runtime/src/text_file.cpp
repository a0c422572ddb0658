#include "dspex/text_file.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

namespace dspex {

std::optional<std::string> read_text_file(const std::string& path, std::size_t max_bytes) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return std::nullopt;
  std::optional<std::string> text{std::in_place};
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0 || text->size() + static_cast<std::size_t>(n) > max_bytes) {
      text.reset();
      break;
    }
    if (n == 0)
      break;
    text->append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return text;
}

} // namespace dspex
