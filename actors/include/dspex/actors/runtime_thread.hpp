// Which threads belong to a runtime. A blocking call into the runtime made
// on one of them (an asynchronous callback, an event handler, an actor)
// would wait for work that thread itself has to do: the public API checks
// this and never blocks there. No CAF in this header.
#pragma once

namespace dspex {

/// True on a thread started by a runtime's actor system (its scheduler
/// threads run every actor, callback and event handler of the runtime).
/// @note Marked by the thread hook that dspex::system_config installs.
bool on_runtime_thread() noexcept;

} // namespace dspex
