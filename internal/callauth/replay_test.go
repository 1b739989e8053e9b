package callauth

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// claimsAt makes the claims of a call by caller (a hex byte repeated) with
// nonce number n, signed at ts. The cache trusts that Verify passed: no
// signature is needed here.
func claimsAt(caller byte, n uint64, ts time.Time) *Claims {
	return &Claims{
		caller: strings.Repeat(hex.EncodeToString([]byte{caller}), 32),
		nonce:  fmt.Sprintf("%032x", n),
		ts:     ts.UnixMilli(),
	}
}

func newCache(t testing.TB, window time.Duration, capacity int) *ReplayCache {
	t.Helper()
	r, err := NewReplayCache(window, capacity)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestReplayCheck(t *testing.T) {
	r := newCache(t, time.Minute, 16)
	now := testTime
	if err := r.Check(claimsAt(1, 1, now), now); err != nil {
		t.Fatal(err)
	}
	err := r.Check(claimsAt(1, 1, now), now.Add(time.Second))
	if !errors.Is(err, ErrReplay) || !strings.Contains(err.Error(), fmt.Sprintf("%032x", 1)) {
		t.Fatalf("replay: %v", err)
	}
	// The same nonce with another timestamp is the same nonce.
	if err := r.Check(claimsAt(1, 1, now.Add(time.Second)), now); !errors.Is(err, ErrReplay) {
		t.Fatalf("replay with another timestamp: %v", err)
	}
	if err := r.Check(claimsAt(1, 2, now), now); err != nil {
		t.Fatalf("another nonce: %v", err)
	}
	// Another caller's nonce is its own: one caller cannot spend another's.
	if err := r.Check(claimsAt(2, 1, now), now); err != nil {
		t.Fatalf("another caller, same nonce: %v", err)
	}
	if cur, prev := r.Len(); cur != 3 || prev != 0 {
		t.Fatalf("Len = %d, %d", cur, prev)
	}
	if err := r.Check(nil, now); err == nil {
		t.Fatal("nil claims accepted")
	}
	if err := r.Check(&Claims{}, now); err == nil {
		t.Fatal("zero claims accepted")
	}
}

func TestReplaySkew(t *testing.T) {
	const w = 2 * time.Minute
	r := newCache(t, w, 16)
	now := testTime
	for i, tc := range []struct {
		offset time.Duration // timestamp - now
		want   string        // "" accepted
	}{
		{0, ""},
		{w, ""},
		{-w, ""},
		{w + time.Millisecond, "2m0.001s ahead of the enclave's clock; the window is ±2m0s"},
		{-w - time.Millisecond, "2m0.001s behind the enclave's clock; the window is ±2m0s"},
		{-time.Hour, "1h0m0s behind"},
		{365 * 24 * time.Hour, "8760h0m0s ahead"},
	} {
		err := r.Check(claimsAt(1, uint64(i), now.Add(tc.offset)), now)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("offset %s: %v", tc.offset, err)
		case tc.want != "" && (!errors.Is(err, ErrSkew) || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("offset %s: %v, want ErrSkew saying %q", tc.offset, err, tc.want)
		}
	}
	// A call refused for its time is not remembered.
	if err := r.Check(claimsAt(1, 3, now), now); err != nil {
		t.Fatalf("nonce of a refused call: %v", err)
	}
}

// A call stays refused for as long as its timestamp passes the window,
// whenever it was accepted within a generation and whichever way the
// caller's clock is off: in particular a call signed with a clock a whole
// window ahead, accepted just before a rotation.
func TestReplayRemembersWhileTheTimestampIsGood(t *testing.T) {
	const w = time.Minute
	step := w / 16
	for _, genAge := range []time.Duration{0, w, 2*w - time.Millisecond} {
		for _, off := range []time.Duration{-w, -w / 2, 0, w / 2, w} {
			r := newCache(t, w, 1024)
			start := testTime
			if err := r.Check(claimsAt(9, 999, start), start); err != nil { // starts the generation
				t.Fatal(err)
			}
			at := start.Add(genAge)
			c := claimsAt(1, 1, at.Add(off))
			if err := r.Check(c, at); err != nil {
				t.Fatalf("first: %v", err)
			}
			for now := at; now.Before(at.Add(5 * w)); now = now.Add(step) {
				err := r.Check(c, now)
				inWindow := inWindow(c, now, w)
				if err == nil {
					t.Fatalf("generation %s old, clock %s off: replay at +%s accepted", genAge, off, now.Sub(at))
				}
				if inWindow && !errors.Is(err, ErrReplay) {
					t.Fatalf("replay at +%s, in the window: %v", now.Sub(at), err)
				}
				if !inWindow && !errors.Is(err, ErrSkew) {
					t.Fatalf("replay at +%s, out of the window: %v", now.Sub(at), err)
				}
				// Keep the cache rotating as a busy one would.
				_ = r.Check(claimsAt(2, uint64(now.UnixNano()), now), now)
			}
		}
	}
}

// A random workload against a model that never forgets: no replay is
// ever accepted, and every fresh call is (the cache is large enough).
func TestReplayModel(t *testing.T) {
	const w = 10 * time.Second
	r := newCache(t, w, 1<<12)
	rng := mrand.New(mrand.NewPCG(1, 2))
	seen := map[[2]uint64]bool{}
	var sent []*Claims
	now := testTime
	for i := range 20000 {
		now = now.Add(time.Duration(rng.IntN(40)) * time.Millisecond)
		var c *Claims
		if len(sent) > 0 && rng.IntN(4) == 0 {
			c = sent[rng.IntN(len(sent))] // a replay, of any age
		} else {
			caller := byte(rng.IntN(3))
			c = claimsAt(caller, uint64(i), now.Add(time.Duration(rng.Int64N(int64(2*w)))-w))
			sent = append(sent, c)
		}
		k := [2]uint64{uint64(c.caller[0]), uint64(len(c.nonce)) ^ hash(c.nonce)}
		err := r.Check(c, now)
		inWindow := inWindow(c, now, w)
		switch {
		case !inWindow && !errors.Is(err, ErrSkew):
			t.Fatalf("call %d out of the window: %v", i, err)
		case inWindow && seen[k] && !errors.Is(err, ErrReplay):
			t.Fatalf("call %d: replay in the window: %v", i, err)
		case inWindow && !seen[k] && err != nil:
			t.Fatalf("call %d: fresh call refused: %v", i, err)
		}
		if err == nil {
			seen[k] = true
		}
	}
}

// inWindow is the window check, on whole milliseconds as the cache does.
func inWindow(c *Claims, now time.Time, w time.Duration) bool {
	d := c.TimestampMillis() - now.UnixMilli()
	return max(d, -d) <= w.Milliseconds()
}

func hash(s string) uint64 {
	var h uint64 = 14695981039346656037
	for i := 0; i < len(s); i++ {
		h = (h ^ uint64(s[i])) * 1099511628211
	}
	return h
}

func TestReplayRotation(t *testing.T) {
	const w = time.Minute
	r := newCache(t, w, 16)
	t0 := testTime
	for i := range 3 {
		if err := r.Check(claimsAt(1, uint64(i), t0), t0); err != nil {
			t.Fatal(err)
		}
	}
	// Within 2W: one generation.
	_ = r.Check(claimsAt(1, 10, t0.Add(2*w-time.Millisecond)), t0.Add(2*w-time.Millisecond))
	if cur, prev := r.Len(); cur != 4 || prev != 0 {
		t.Fatalf("before 2W: Len %d, %d", cur, prev)
	}
	t1 := t0.Add(2 * w)
	_ = r.Check(claimsAt(1, 11, t1), t1)
	if cur, prev := r.Len(); cur != 1 || prev != 4 {
		t.Fatalf("at 2W: Len %d, %d", cur, prev)
	}
	t2 := t1.Add(2 * w)
	_ = r.Check(claimsAt(1, 12, t2), t2)
	if cur, prev := r.Len(); cur != 1 || prev != 1 {
		t.Fatalf("at 4W: Len %d, %d", cur, prev)
	}
	// Idle for 4W and more: both forgotten.
	t3 := t2.Add(4 * w)
	_ = r.Check(claimsAt(1, 13, t3), t3)
	if cur, prev := r.Len(); cur != 1 || prev != 0 {
		t.Fatalf("after 4W idle: Len %d, %d", cur, prev)
	}
	// A clock stepping back does not rotate: nothing is forgotten early.
	back := t3.Add(-time.Hour)
	if err := r.Check(claimsAt(1, 13, back.Add(-w/2)), back); !errors.Is(err, ErrReplay) {
		t.Fatalf("clock stepped back: %v", err)
	}
	_ = r.Check(claimsAt(1, 14, back), back)
	if cur, _ := r.Len(); cur != 2 {
		t.Fatalf("clock stepped back: current generation has %d calls, want 2", cur)
	}
}

// A full generation refuses new calls (fail closed), still reports
// replays as replays, and takes calls again once it rotates.
func TestReplayCacheFull(t *testing.T) {
	const w = time.Minute
	r := newCache(t, w, 4)
	now := testTime
	for i := range 4 {
		if err := r.Check(claimsAt(1, uint64(i), now), now); err != nil {
			t.Fatal(err)
		}
	}
	later := now.Add(30 * time.Second)
	err := r.Check(claimsAt(1, 100, later), later)
	if !errors.Is(err, ErrCacheFull) || !strings.Contains(err.Error(), "4 calls") || !strings.Contains(err.Error(), "for 1m30s") {
		t.Fatalf("full: %v", err)
	}
	if err := r.Check(claimsAt(1, 2, later), later); !errors.Is(err, ErrReplay) {
		t.Fatalf("replay into a full cache: %v", err)
	}
	if err := r.Check(claimsAt(1, 100, later), later); !errors.Is(err, ErrCacheFull) {
		t.Fatalf("refused call was remembered: %v", err)
	}
	next := now.Add(2 * w)
	if err := r.Check(claimsAt(1, 100, next), next); err != nil {
		t.Fatalf("after rotation: %v", err)
	}
	if err := r.Check(claimsAt(1, 3, next.Add(-w)), next); !errors.Is(err, ErrReplay) {
		t.Fatalf("previous generation forgotten: %v", err)
	}
}

func TestReplayCacheConcurrent(t *testing.T) {
	r := newCache(t, time.Minute, 1<<16)
	const workers, each, shared = 8, 500, 200
	var accepted [shared]atomic.Int32
	var wg sync.WaitGroup
	now := testTime
	for g := range workers {
		wg.Go(func() {
			for i := range each {
				if err := r.Check(claimsAt(1, uint64(1_000_000+g*each+i), now), now); err != nil {
					t.Errorf("fresh call refused: %v", err)
					return
				}
				n := i % shared
				switch err := r.Check(claimsAt(2, uint64(n), now), now); {
				case err == nil:
					accepted[n].Add(1)
				case !errors.Is(err, ErrReplay):
					t.Errorf("shared nonce: %v", err)
					return
				}
				if i%50 == 0 {
					r.Len()
				}
			}
		})
	}
	wg.Wait()
	for n := range accepted {
		if got := accepted[n].Load(); got != 1 {
			t.Fatalf("shared nonce %d accepted %d times", n, got)
		}
	}
	if cur, _ := r.Len(); cur != workers*each+shared {
		t.Fatalf("Len = %d", cur)
	}
}

func TestNewReplayCacheRefusals(t *testing.T) {
	for _, tc := range []struct {
		w    time.Duration
		n    int
		want string
	}{
		{0, 1, "window 0s"},
		{-time.Second, 1, "window -1s"},
		{25 * time.Hour, 1, "window 25h0m0s"},
		{time.Minute, 0, "capacity 0"},
		{time.Minute, MaxCapacity + 1, "capacity 16777217"},
	} {
		if _, err := NewReplayCache(tc.w, tc.n); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewReplayCache(%s, %d): %v", tc.w, tc.n, err)
		}
	}
	r := newCache(t, DefaultWindow, DefaultCapacity)
	if r.Window() != DefaultWindow || r.Capacity() != DefaultCapacity || r.MemoryBytes() != 8<<20 {
		t.Fatalf("defaults: %s %d %d", r.Window(), r.Capacity(), r.MemoryBytes())
	}
}

func TestTableSlots(t *testing.T) {
	for _, tc := range []struct{ capacity, slots int }{
		{1, 2}, {2, 4}, {3, 4}, {4, 8}, {6, 8}, {7, 16}, {12, 16}, {13, 32},
		{DefaultCapacity, 1 << 19}, {3 << 16, 1 << 18}, {3<<16 + 1, 1 << 19}, {MaxCapacity, 1 << 25},
	} {
		got := tableSlots(tc.capacity)
		if got != tc.slots || tc.capacity*4 > got*3 {
			t.Errorf("tableSlots(%d) = %d, want %d", tc.capacity, got, tc.slots)
		}
	}
}

func randomNonce(t testing.TB) string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b[:])
}

// heapAlloc is the live heap after a full collection.
func heapAlloc() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// The cache's memory, measured: what NewReplayCache allocates for the
// default capacity (the figure in the ReplayCache documentation), and
// nothing more when both generations are filled to the brim.
func TestReplayCacheMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("fills 2 x 262144 entries")
	}
	const w = time.Minute
	claims := &Claims{caller: strings.Repeat("ab", 32), nonce: randomNonce(t)}
	before := heapAlloc()
	r := newCache(t, w, DefaultCapacity)
	made := heapAlloc()
	now := testTime
	fill := func() {
		for i := range DefaultCapacity {
			claims.nonce = fmt.Sprintf("%016x%016x", now.UnixMilli(), i)
			claims.ts = now.UnixMilli()
			if err := r.Check(claims, now); err != nil {
				t.Fatalf("entry %d: %v", i, err)
			}
		}
		if err := r.Check(claimsAt(3, 1, now), now); !errors.Is(err, ErrCacheFull) {
			t.Fatalf("one more: %v", err)
		}
	}
	fill()
	now = now.Add(2 * w)
	fill()
	full := heapAlloc()
	cur, prev := r.Len()
	runtime.KeepAlive(r)
	t.Logf("NewReplayCache(%s, %d): heap +%d bytes; after filling both generations (%d + %d calls) +%d bytes (MemoryBytes %d)",
		w, DefaultCapacity, made-before, cur, prev, full-before, r.MemoryBytes())
	if cur != DefaultCapacity || prev != DefaultCapacity {
		t.Fatalf("Len = %d, %d", cur, prev)
	}
	const slack = 64 << 10 // the struct, the test's own garbage, the runtime's noise
	if d := int64(full) - int64(before); d > int64(r.MemoryBytes())+slack || d < int64(r.MemoryBytes()) {
		t.Fatalf("a full cache takes %d bytes, MemoryBytes says %d", d, r.MemoryBytes())
	}
	if d := int64(full) - int64(made); d > slack {
		t.Fatalf("filling the cache grew the heap by %d bytes", d)
	}
}
