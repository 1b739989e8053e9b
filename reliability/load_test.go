package reliability_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/internal/sigalg"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// keyCache verifies signatures against the key they name, fetching keys it
// has not seen (a restarted enclave has new ones) through the same client.
type keyCache struct {
	mu   sync.Mutex
	keys map[string]crypto.PublicKey
}

func newKeyCache() *keyCache { return &keyCache{keys: map[string]crypto.PublicKey{}} }

func (k *keyCache) verify(ctx context.Context, cc grpc.ClientConnInterface, msg []byte, resp *pb.SignResponse) error {
	k.mu.Lock()
	pub, ok := k.keys[resp.GetKeyId()]
	k.mu.Unlock()
	if !ok {
		r, err := pb.NewSignerServiceClient(cc).GetPublicKey(ctx, &pb.GetPublicKeyRequest{
			Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: resp.GetKeyId()}}})
		if err != nil {
			return fmt.Errorf("fetch key %s: %w", resp.GetKeyId(), err)
		}
		if pub, err = x509.ParsePKIXPublicKey(r.GetKey().GetPublicKey()); err != nil {
			return err
		}
		k.mu.Lock()
		k.keys[resp.GetKeyId()] = pub
		k.mu.Unlock()
	}
	return sigalg.Verify(pub, resp.GetSigningAlgorithm(), pb.MessageType_MESSAGE_TYPE_RAW, msg, resp.GetSignature())
}

// errWrong marks an answer that came back OK but wrong: a signature that
// does not verify, another caller's Echo payload.
var errWrong = errors.New("wrong answer")

// loadStats counts the outcomes of a load run.
type loadStats struct {
	ok, wrong, overDeadline atomic.Int64
	codes                   sync.Map // codes.Code -> *atomic.Int64
	firstWrong              atomic.Value
	firstErr                sync.Map // codes.Code -> string
}

func (s *loadStats) fail(err error) {
	c := status.Code(err)
	v, _ := s.codes.LoadOrStore(c, new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
	s.firstErr.LoadOrStore(c, err.Error())
}

func (s *loadStats) count(c codes.Code) int64 {
	if v, ok := s.codes.Load(c); ok {
		return v.(*atomic.Int64).Load()
	}
	return 0
}

// failures is every failed call by code.
func (s *loadStats) failures() map[codes.Code]int64 {
	out := map[codes.Code]int64{}
	s.codes.Range(func(k, v any) bool {
		out[k.(codes.Code)] = v.(*atomic.Int64).Load()
		return true
	})
	return out
}

func (s *loadStats) total() int64 {
	n := s.ok.Load() + s.wrong.Load()
	for _, v := range s.failures() {
		n += v
	}
	return n
}

func (s *loadStats) String() string {
	var parts []string
	for c, n := range s.failures() {
		first, _ := s.firstErr.Load(c)
		parts = append(parts, fmt.Sprintf("%s=%d (first: %v)", c, n, first))
	}
	sort.Strings(parts)
	return fmt.Sprintf("ok=%d wrong=%d over-deadline=%d %s", s.ok.Load(), s.wrong.Load(), s.overDeadline.Load(), strings.Join(parts, " "))
}

// onlyCodes reports the failure codes outside allowed.
func (s *loadStats) onlyCodes(allowed ...codes.Code) error {
	for c, n := range s.failures() {
		ok := false
		for _, a := range allowed {
			ok = ok || c == a
		}
		if !ok {
			first, _ := s.firstErr.Load(c)
			return fmt.Errorf("%d calls failed with %s (first: %v)", n, c, first)
		}
	}
	return nil
}

// mixedCall makes call number i of worker w: Echo of a unique payload, or
// Sign of a unique message with ECC, Ed25519 or (one in eight) RSA, each
// answer checked: the payload comes back, the signature verifies.
func mixedCall(ctx context.Context, cc grpc.ClientConnInterface, kc *keyCache, w, i int) error {
	msg := fmt.Appendf(nil, "worker %d call %d", w, i)
	if i%2 == 0 {
		resp, err := pb.NewEchoServiceClient(cc).Echo(ctx, &pb.EchoRequest{Payload: msg})
		if err != nil {
			return err
		}
		if !bytes.Equal(resp.GetPayload(), msg) {
			return fmt.Errorf("%w: Echo answered %q to %q", errWrong, resp.GetPayload(), msg)
		}
		return nil
	}
	kt := pb.KeyType_KEY_TYPE_ECC
	switch (i / 2) % 8 {
	case 1, 3, 5:
		kt = pb.KeyType_KEY_TYPE_ED25519
	case 7:
		kt = pb.KeyType_KEY_TYPE_RSA
	}
	resp, err := pb.NewSignerServiceClient(cc).Sign(ctx, &pb.SignRequest{
		Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: kt}}, Message: msg})
	if err != nil {
		return err
	}
	if verr := kc.verify(ctx, cc, msg, resp); verr != nil {
		if status.Code(verr) != codes.Unknown {
			return verr // fetching the key failed: a failed call, not a wrong answer
		}
		return fmt.Errorf("%w: %v", errWrong, verr)
	}
	return nil
}

// loadOpts tune runLoad.
type loadOpts struct {
	workers  int
	deadline time.Duration // per call
	// calls, when > 0, stops after this many calls in all; otherwise the
	// load runs until stop is closed.
	calls int64
	// pause after a failed call, so a dead upstream is not spun on.
	pause time.Duration
	// every, when set, is called by worker 0 after each of its calls.
	every func(done int64)
}

// runLoad runs workers making mixedCalls until stop is closed or o.calls
// are made; it returns when they all have ended.
func runLoad(cc grpc.ClientConnInterface, o loadOpts, stop <-chan struct{}, st *loadStats) {
	kc := newKeyCache()
	var (
		wg     sync.WaitGroup
		issued atomic.Int64
	)
	for w := range o.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if o.calls > 0 && issued.Add(1) > o.calls {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), o.deadline)
				start := time.Now()
				err := mixedCall(ctx, cc, kc, w, i)
				cancel()
				// A hung call, not a slow one: far past its deadline.
				if time.Since(start) > o.deadline+2*time.Second {
					st.overDeadline.Add(1)
				}
				switch {
				case err == nil:
					st.ok.Add(1)
				case errors.Is(err, errWrong):
					st.wrong.Add(1)
					st.firstWrong.CompareAndSwap(nil, err.Error())
				default:
					st.fail(err)
					if o.pause > 0 {
						time.Sleep(o.pause)
					}
				}
				if w == 0 && o.every != nil {
					o.every(st.total())
				}
			}
		}()
	}
	wg.Wait()
}
