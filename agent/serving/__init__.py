"""The vLLM side of `serve`: starting vLLM while the weights are still arriving.

- `agent.serving.background`: the agent's side. `serve` forks the pull into a background process
  before anything else; the pull fetches what vLLM reads before any weight first, places it with the
  ref and says so through a pipe; the agent then execs vLLM at once (same pid), while the background
  pull goes on fetching the weights in the order vLLM reads them.
- `agent.serving.arrivals`: the record through which the background pull tells vLLM's processes which
  weight files are verified and in place (standard library only: vLLM's processes import it).
- `agent.serving.plugin`: the vLLM plugin (a `vllm.general_plugins` entry point): a load format whose
  loader hands each weight file to vLLM's own loading once the record says it is ready, and, in vLLM's
  main process, a watcher that stops vLLM with the agent's error when the weights cannot be had.
- `agent.serving.probe`: whether the vLLM that will run has the plugin and the extension points.

Nothing here imports the pull's SDKs at module level, and the plugin and the record import nothing
of the agent beyond themselves: they run inside vLLM's interpreter.
"""
