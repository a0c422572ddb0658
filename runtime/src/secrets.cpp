// Secret keys and their redaction (see secrets.hpp).
#include "dspex/secrets.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <string>
#include <vector>

namespace dspex {

bool is_secret_key(std::string_view key) noexcept {
  static constexpr std::array<std::string_view, 9> words = {
    "api_key", "apikey", "secret", "token", "password", "passwd", "authorization",
    "credential", "private_key"};
  // Keys are short; longer ones are compared on their first 256 bytes.
  char lower[256];
  auto n = std::min(key.size(), sizeof lower);
  for (std::size_t i = 0; i < n; ++i)
    lower[i] = static_cast<char>(std::tolower(static_cast<unsigned char>(key[i])));
  std::string_view k(lower, n);
  return std::any_of(words.begin(), words.end(),
                     [&](std::string_view w) { return k.find(w) != std::string_view::npos; });
}

nlohmann::json redacted(const nlohmann::json& value) {
  nlohmann::json out = value.is_structured() ? nlohmann::json(value.type()) : value;
  if (!value.is_structured())
    return out;
  // (source, destination) pairs; destinations are filled in place.
  std::vector<std::pair<const nlohmann::json*, nlohmann::json*>> todo{{&value, &out}};
  while (!todo.empty()) {
    auto [src, dst] = todo.back();
    todo.pop_back();
    if (src->is_object()) {
      for (auto it = src->begin(); it != src->end(); ++it) {
        auto& slot = (*dst)[it.key()];
        if (is_secret_key(it.key()) && !it.value().is_null())
          slot = redacted_marker;
        else if (it.value().is_structured()) {
          slot = nlohmann::json(it.value().type());
          todo.emplace_back(&it.value(), &slot);
        } else
          slot = it.value();
      }
    } else {
      // Arrays: the elements are appended first, then filled, so the
      // pointers into `dst` stay valid (no push_back after this loop).
      for (const auto& child : *src)
        dst->push_back(child.is_structured() ? nlohmann::json(child.type()) : child);
      for (std::size_t i = 0; i < src->size(); ++i)
        if ((*src)[i].is_structured())
          todo.emplace_back(&(*src)[i], &(*dst)[i]);
    }
  }
  return out;
}

} // namespace dspex
