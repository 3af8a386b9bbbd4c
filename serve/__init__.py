"""How a model ANSWERS: requests and their state (`request`, `request_checks`), the paged KV cache and its page
allocator with prefix caching (`kv_cache`, `block_allocator`), the scheduler (`scheduler`), one step's flat ragged
batch and its attention (`step_batch`, `ragged_attention`, the Pallas decode kernel in `kernels/`), the model step
over the cache (`forward`), sampling (`sampling`), the device step that runs them and samples or verifies
(`engine_step`), the continuous-batching engine (`engine`), speculative decoding (the rejection sampler
`speculative`, the proposers `ngram`, `draft_model`, `draft_head_runner`, their settings `speculation_config` and
the policy choosing each step's k, `speculation_policy`), static batching, the baseline (`static`), the cache-free
reference decoder (`naive`), and prompt files (`prompts`)."""
