-- echo.lua: test-only script (loaded by path by tests/test_upstash_endpoint.py); it touches no key.
-- KEYS: any number of keys, only echoed back (never read or written)
-- ARGV: any number of strings, echoed back
-- returns: a two-element array {KEYS, ARGV}, each an array of strings
return {KEYS, ARGV}
