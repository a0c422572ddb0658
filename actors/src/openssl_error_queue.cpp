// OpenSSL's error queue, cleared before every TLS call of CAF 0.17's
// OpenSSL module (libcaf_openssl).
//
// Why: OpenSSL keeps one error queue per thread, and SSL_get_error() reads
// it: it must be empty before an SSL I/O call, or the call's result is
// misread (SSL_get_error(3)). CAF 0.17's session code never clears it, and
// one multiplexer thread runs every connection of a node. So a peer refused
// in the handshake (a foreign certificate, a plaintext client) left its
// errors behind, and the next read of another, authenticated connection
// failed on them: any stranger that opened a TLS connection to a node cut
// its good peers off (measured here: every refused handshake dropped every
// caller's link; test_nodes' TLS case). The same bug and fix in other
// servers: h2o pull request 1448, dovecot pull request 29.
//
// How: these definitions interpose the library's functions of the same
// names (the executable's symbols come first in the dynamic lookup), clear
// the queue, and call the real function (dlsym RTLD_NEXT). They run only on
// the middleman's threads, for CAF's sessions: dspex itself calls no OpenSSL.
#include <dlfcn.h>

#include <atomic>

#include "dspex/logging.hpp"
#include "openssl_error_queue.hpp"

struct ssl_st;

namespace {

template <class Fn>
Fn real(const char* name) {
  return reinterpret_cast<Fn>(::dlsym(RTLD_NEXT, name));
}

void clear_error_queue() {
  using clear_fn = void (*)();
  static const auto clear = reinterpret_cast<clear_fn>(::dlsym(RTLD_DEFAULT, "ERR_clear_error"));
  if (clear)
    clear();
}

} // namespace

extern "C" {

int SSL_read(ssl_st* ssl, void* buf, int num) {
  static const auto fn = real<int (*)(ssl_st*, void*, int)>("SSL_read");
  clear_error_queue();
  return fn(ssl, buf, num);
}

int SSL_write(ssl_st* ssl, const void* buf, int num) {
  static const auto fn = real<int (*)(ssl_st*, const void*, int)>("SSL_write");
  clear_error_queue();
  return fn(ssl, buf, num);
}

int SSL_accept(ssl_st* ssl) {
  static const auto fn = real<int (*)(ssl_st*)>("SSL_accept");
  clear_error_queue();
  return fn(ssl);
}

int SSL_connect(ssl_st* ssl) {
  static const auto fn = real<int (*)(ssl_st*)>("SSL_connect");
  clear_error_queue();
  return fn(ssl);
}

int SSL_do_handshake(ssl_st* ssl) {
  static const auto fn = real<int (*)(ssl_st*)>("SSL_do_handshake");
  clear_error_queue();
  return fn(ssl);
}

int SSL_shutdown(ssl_st* ssl) {
  static const auto fn = real<int (*)(ssl_st*)>("SSL_shutdown");
  clear_error_queue();
  auto r = fn(ssl);
  clear_error_queue();  // a shutdown on a dead socket leaves errors nobody reads
  return r;
}

} // extern "C"

namespace dspex::detail {

bool openssl_error_queue_guarded() {
  // In effect when the process resolves SSL_read to the definition above.
  auto resolved = ::dlsym(RTLD_DEFAULT, "SSL_read");
  bool ours = resolved == reinterpret_cast<void*>(&SSL_read);
  static std::atomic<bool> warned{false};
  if (!ours && !warned.exchange(true))
    log().warn("TLS: OpenSSL's error queue is not cleared before CAF's TLS calls (dspex is not "
               "linked into the executable); a peer refused in the handshake may drop other "
               "connections of this node");
  return ours;
}

} // namespace dspex::detail
