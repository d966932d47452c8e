"""The inference engine: requests, scheduler, paged KV cache, runner, sampler, speculation, metrics. Never imports textual."""
