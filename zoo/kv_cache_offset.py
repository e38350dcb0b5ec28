"""KV-cache position off by one: with a cache (Sk > Sq) the new queries are placed one
position early (past length taken as Sk - Sq - 1), so each query misses its own key and a
decoding step never sees the token it just appended."""

from attnbench.zoo._base import Kernel, member


class KvCacheOffset(Kernel):
    def offset(self, cfg, Sq, Sk):
        off = super().offset(cfg, Sq, Sk)
        return off - 1 if Sk > Sq and cfg.align == "bottom_right" else off


kv_cache_offset = member("kv_cache_offset", KvCacheOffset(), "KV-cache offset off by one (Sk - Sq - 1)")
