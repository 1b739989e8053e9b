package callauth

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"time"
)

// Defaults of a ReplayCache; see NewReplayCache for what they cost.
const (
	// DefaultWindow is the clock skew allowed between a caller and the
	// enclave. EC2 instances keep time within a millisecond (Amazon Time
	// Sync); two minutes leave room for a badly synchronised client
	// without keeping a recorded call good for long.
	DefaultWindow = 2 * time.Minute
	// DefaultCapacity is the number of calls one generation remembers:
	// with DefaultWindow, a sustained 1,092 signed calls a second (see
	// NewReplayCache), in 8 MiB.
	DefaultCapacity = 1 << 18
	// MaxCapacity bounds the capacity: 2^24 calls a generation take 2 x
	// 256 MiB, the whole of a 512 MiB enclave.
	MaxCapacity = 1 << 24
)

var (
	// ErrSkew is wrapped when a call's timestamp is further than the
	// window from the enclave's clock.
	ErrSkew = errors.New("callauth: call timestamp outside the window")
	// ErrReplay is wrapped when a caller's nonce was seen already.
	ErrReplay = errors.New("callauth: replayed call")
	// ErrCacheFull is wrapped when the cache cannot remember one more
	// call: it refuses the call rather than accept one it could not
	// recognise again.
	ErrCacheFull = errors.New("callauth: replay cache full")
)

// ReplayCache refuses calls whose timestamp is too far from the enclave's
// clock and calls it has seen already. Check it only after the call's
// signature verified: a call nobody signed must not take a place in it.
//
// It remembers (caller, nonce) pairs in two generations, current and
// previous, of at most Capacity pairs each. A generation lasts 2W (W the
// window); then the current one becomes the previous one and the previous
// one is forgotten. A pair is thus remembered for at least 2W after the
// call was accepted, and a call accepted at time t has a timestamp of at
// most t+W, which is outside the window from t+2W on: a call is forgotten
// only when its timestamp can no longer pass the window check, whichever
// way the caller's clock is off. (Generations of W would forget a call
// signed with a clock W ahead while its timestamp is still good: a replay
// window of up to W.)
//
// Memory is allocated once, by NewReplayCache, and never grows: each
// generation is an open-addressing table of 8-byte entries (the first 64
// bits of SHA-256 over a random per-cache salt, the caller's key id and
// the nonce; an honest call is taken for a replay with probability at most
// 2^-39 even at MaxCapacity, and a
// caller, not knowing the salt, can neither aim at another caller's
// entries nor lengthen the probe chains). A table has the smallest power
// of two of slots that keeps it at most 3/4 full, so the cache takes
// 2 x 8 x slots bytes: 8 MiB (8,388,608 bytes) for DefaultCapacity,
// measured by TestReplayCacheMemory (NewReplayCache grows the heap by
// 8,388,928 bytes, the tables and the struct; filling both generations
// to the brim adds nothing, a few KiB of the test's own garbage aside).
//
// It is safe for concurrent use: one mutex, held for a lookup and an
// insertion (the hashing happens outside it); BenchmarkReplayCheckParallel
// measures the contention. Rotating clears a table under the mutex
// (memclr of 4 MiB for DefaultCapacity: a few hundred microseconds, once
// every 2W).
//
// Time is the wall clock given to Check, for the window and the
// generations alike. A clock that steps back delays the rotation (calls
// are remembered longer); one that steps forward ages calls and
// timestamps alike.
type ReplayCache struct {
	windowMs int64
	periodMs int64 // 2W
	capacity int
	salt     [16]byte

	mu       sync.Mutex
	started  bool
	genStart int64 // wall clock, Unix ms, when cur began
	cur      table
	prev     table
}

// table is a set of nonzero uint64 keys: linear probing in a power-of-two
// array, 0 marking an empty slot.
type table struct {
	slots []uint64
	n     int
}

// NewReplayCache returns a cache for a clock skew window (1 ms to 24 h;
// DefaultWindow) remembering at most capacity calls per generation (1 to
// MaxCapacity; DefaultCapacity). It allocates its whole memory: 16 bytes
// for each slot, slots being the smallest power of two at least 4/3 of
// capacity.
//
// Size capacity for the rate of signed calls: a generation lasts 2 x
// window and must hold every call accepted in it, so the sustained rate
// the cache accepts is capacity / (2 x window) calls a second (1,092 with
// the defaults); above it, Check fails closed with ErrCacheFull until the
// generation ends. For 10,000 calls a second, a 30 s window and a capacity
// of 2^20 (32 MiB) give 17,476.
func NewReplayCache(window time.Duration, capacity int) (*ReplayCache, error) {
	if window < time.Millisecond || window > 24*time.Hour {
		return nil, fmt.Errorf("callauth: replay window %s: want 1ms to 24h", window)
	}
	if capacity < 1 || capacity > MaxCapacity {
		return nil, fmt.Errorf("callauth: replay cache capacity %d: want 1 to %d", capacity, MaxCapacity)
	}
	r := &ReplayCache{
		windowMs: window.Milliseconds(),
		periodMs: 2 * window.Milliseconds(),
		capacity: capacity,
	}
	if _, err := rand.Read(r.salt[:]); err != nil {
		return nil, fmt.Errorf("callauth: replay cache salt: %w", err)
	}
	n := tableSlots(capacity)
	r.cur.slots = make([]uint64, n)
	r.prev.slots = make([]uint64, n)
	return r, nil
}

// tableSlots is the smallest power of two >= ceil(4*capacity/3).
func tableSlots(capacity int) int {
	need := uint64(capacity*4+2) / 3
	return 1 << bits.Len64(need-1)
}

// MemoryBytes is the memory the cache's tables take, allocated by
// NewReplayCache.
func (r *ReplayCache) MemoryBytes() int { return 16 * len(r.cur.slots) }

// Window is the allowed clock skew.
func (r *ReplayCache) Window() time.Duration { return time.Duration(r.windowMs) * time.Millisecond }

// Capacity is the number of calls one generation remembers.
func (r *ReplayCache) Capacity() int { return r.capacity }

// Len returns the number of calls the current and the previous generation
// remember.
func (r *ReplayCache) Len() (current, previous int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cur.n, r.prev.n
}

// Check accepts a call whose signature verified, at time now (the
// enclave's clock): it refuses a timestamp more than the window away from
// now (ErrSkew), a (caller, nonce) pair it remembers (ErrReplay), and,
// failing closed, any new call when the current generation is full
// (ErrCacheFull). An accepted call is remembered (see ReplayCache).
func (r *ReplayCache) Check(c *Claims, now time.Time) error {
	if c == nil || len(c.caller) != CallerIDLen || len(c.nonce) != NonceLen {
		return errors.New("callauth: replay check: claims not from ParseMetadata")
	}
	nowMs := now.UnixMilli()
	if d := c.ts - nowMs; d > r.windowMs || -d > r.windowMs {
		return skewError(d, r.windowMs)
	}
	key := r.key(c)

	r.mu.Lock()
	defer r.mu.Unlock()
	r.rotate(nowMs)
	if r.prev.has(key) {
		return replayError(c)
	}
	switch r.cur.insert(key, r.capacity) {
	case present:
		return replayError(c)
	case full:
		next := time.Duration(r.genStart+r.periodMs-nowMs) * time.Millisecond
		return fmt.Errorf("%w: %d calls accepted in the current generation (%s long); new calls are refused for %s, until it ends",
			ErrCacheFull, r.cur.n, time.Duration(r.periodMs)*time.Millisecond, next)
	}
	return nil
}

func skewError(aheadMs, windowMs int64) error {
	way, d := "ahead of", aheadMs
	if aheadMs < 0 {
		way, d = "behind", -aheadMs
	}
	return fmt.Errorf("%w: the call's timestamp is %s %s the enclave's clock; the window is ±%s",
		ErrSkew, time.Duration(d)*time.Millisecond, way, time.Duration(windowMs)*time.Millisecond)
}

func replayError(c *Claims) error {
	return fmt.Errorf("%w: caller %s used nonce %s already", ErrReplay, c.caller, c.nonce)
}

// key maps (caller, nonce) to a nonzero 64-bit entry: the first 8 bytes of
// SHA-256(salt || caller id bytes || nonce bytes).
func (r *ReplayCache) key(c *Claims) uint64 {
	var in [16 + CallerIDLen/2 + NonceLen/2]byte
	copy(in[:16], r.salt[:])
	// The fields are lower-case hex (ParseMetadata).
	unhex(in[16:16+CallerIDLen/2], c.caller)
	unhex(in[16+CallerIDLen/2:], c.nonce)
	sum := sha256.Sum256(in[:])
	k := binary.LittleEndian.Uint64(sum[:8])
	if k == 0 {
		k = 1
	}
	return k
}

// rotate starts a new generation when the current one is 2W old, and
// forgets both when it is 4W old. Called with mu held.
func (r *ReplayCache) rotate(nowMs int64) {
	if !r.started {
		r.started, r.genStart = true, nowMs
		return
	}
	el := nowMs - r.genStart
	if el < r.periodMs {
		// Also when the clock stepped back: keeping calls longer is safe.
		return
	}
	if el >= 2*r.periodMs {
		r.cur.reset()
	}
	r.prev.reset()
	r.cur, r.prev = r.prev, r.cur
	r.genStart = nowMs
}

// unhex decodes the lower-case hex s into dst (len(s) == 2*len(dst)),
// without the allocation of converting s to a []byte.
func unhex(dst []byte, s string) {
	for i := range dst {
		dst[i] = nibble(s[2*i])<<4 | nibble(s[2*i+1])
	}
}

func nibble(c byte) byte {
	if c <= '9' {
		return c - '0'
	}
	return c - 'a' + 10
}

type insertResult uint8

const (
	inserted insertResult = iota
	present
	full
)

func (t *table) has(k uint64) bool {
	mask := uint64(len(t.slots) - 1)
	for i := k & mask; ; i = (i + 1) & mask {
		switch t.slots[i] {
		case k:
			return true
		case 0:
			return false
		}
	}
}

// insert adds k unless it is present or the table holds capacity keys
// already. capacity <= 3/4 of the slots, so a probe always ends.
func (t *table) insert(k uint64, capacity int) insertResult {
	mask := uint64(len(t.slots) - 1)
	for i := k & mask; ; i = (i + 1) & mask {
		switch t.slots[i] {
		case k:
			return present
		case 0:
			if t.n >= capacity {
				return full
			}
			t.slots[i] = k
			t.n++
			return inserted
		}
	}
}

func (t *table) reset() {
	if t.n > 0 {
		clear(t.slots)
		t.n = 0
	}
}
