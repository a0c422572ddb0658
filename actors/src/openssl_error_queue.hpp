// See openssl_error_queue.cpp: why dspex clears OpenSSL's error queue before
// each TLS call of CAF 0.17, and how.
//
// Internal to actors/.
#pragma once

namespace dspex::detail {

/// Links the interposed OpenSSL calls into the program (a reference to this
/// file) and checks that they are the ones in effect; warns once otherwise.
/// @returns true when the error queue is cleared before each TLS call
bool openssl_error_queue_guarded();

} // namespace dspex::detail
