package e2e

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/nitrosign/nitrosign/host/client"
	"github.com/nitrosign/nitrosign/internal/sigalg"
	"github.com/nitrosign/nitrosign/internal/target"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Several enclave processes behind one proxy process over real vsock: two
// nitrosign-enclave processes on two ports of CID 1 derive one keyset from
// the same --dev-key-seed, the proxy has an --upstream for each.

// enclaveSigns is the enclave's own count of Sign calls, asked over vsock
// directly (StatsService/GetStats), not through the proxy.
func enclaveSigns(t *testing.T, vsockTarget string) uint64 {
	t.Helper()
	tgt, err := target.Parse(vsockTarget)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := grpc.NewClient(tgt.GRPCTarget(), grpc.WithContextDialer(tgt.Dialer()), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	s, err := pb.NewStatsServiceClient(cc).GetStats(callCtx(t), &pb.GetStatsRequest{})
	if err != nil {
		t.Fatalf("GetStats of %s: %v", vsockTarget, err)
	}
	var n uint64
	for _, c := range s.GetCalls() {
		if c.GetMethod() == "/nitrosign.v1.SignerService/Sign" {
			n += c.GetCount()
		}
	}
	return n
}

// keyIDs is every key id c serves, by key type.
func keyIDs(t *testing.T, c *client.Client) map[pb.KeyType]*pb.KeyInfo {
	t.Helper()
	resp, err := c.Signer.ListKeys(callCtx(t), &pb.ListKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[pb.KeyType]*pb.KeyInfo{}
	for _, k := range resp.GetKeys() {
		out[k.GetKeyType()] = k
	}
	if len(out) != 3 {
		t.Fatalf("%d keys, want 3", len(out))
	}
	return out
}

// multiLoad signs with the ECC key until stop is closed, by key type and
// by key id in turn, and checks every answer against the key fetched
// before the load: the same key id, a signature that verifies.
type multiLoad struct {
	ok, wrong atomic.Int64
	mu        sync.Mutex
	failed    map[string]int // by message, addresses elided
	firstBad  string
}

var addrRE = regexp.MustCompile(`\d+\.\d+\.\d+\.\d+:\d+|vsock://\d+:\d+`)

func (l *multiLoad) fail(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.failed == nil {
		l.failed = map[string]int{}
	}
	l.failed[addrRE.ReplaceAllString(err.Error(), "ADDR")]++
}

func (l *multiLoad) failures() map[string]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[string]int{}
	for k, v := range l.failed {
		out[k] = v
	}
	return out
}

func (l *multiLoad) String() string {
	return fmt.Sprintf("ok=%d wrong=%d failed=%v", l.ok.Load(), l.wrong.Load(), l.failures())
}

func (l *multiLoad) run(c *client.Client, key *pb.KeyInfo, workers int, deadline time.Duration, stop <-chan struct{}) *sync.WaitGroup {
	pub, err := x509.ParsePKIXPublicKey(key.GetPublicKey())
	var wg sync.WaitGroup
	if err != nil {
		l.wrong.Add(1)
		l.firstBad = err.Error()
		return &wg
	}
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				msg := fmt.Appendf(nil, "multi worker %d call %d", w, i)
				sel := &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: key.GetKeyType()}}
				if i%2 == 1 {
					sel = &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: key.GetKeyId()}}
				}
				ctx, cancel := context.WithTimeout(context.Background(), deadline)
				resp, err := c.Signer.Sign(ctx, &pb.SignRequest{Key: sel, Message: msg})
				cancel()
				if err != nil {
					l.fail(err)
					time.Sleep(5 * time.Millisecond)
					continue
				}
				if verr := l.check(pub, key.GetKeyId(), msg, resp); verr != nil {
					l.mu.Lock()
					if l.firstBad == "" {
						l.firstBad = verr.Error()
					}
					l.mu.Unlock()
					l.wrong.Add(1)
					continue
				}
				l.ok.Add(1)
			}
		}()
	}
	return &wg
}

func (l *multiLoad) check(pub crypto.PublicKey, id string, msg []byte, resp *pb.SignResponse) error {
	if resp.GetKeyId() != id {
		return fmt.Errorf("signed by key %s, want %s", resp.GetKeyId(), id)
	}
	return sigalg.Verify(pub, resp.GetSigningAlgorithm(), pb.MessageType_MESSAGE_TYPE_RAW, msg, resp.GetSignature())
}

// Two enclave processes with the same --dev-key-seed behind one proxy
// process (two --upstream), over real vsock, under a steady load of Sign
// calls through the proxy: both enclaves sign; one is sent SIGTERM (it
// drains and exits 0) and restarted; then the other is SIGKILLed. No call
// fails, no signature is wrong, and the proxy's logs name both upstreams.
func TestMultiEnclaveOverVsock(t *testing.T) {
	seedBytes := make([]byte, 32)
	if _, err := rand.Read(seedBytes); err != nil {
		t.Fatal(err)
	}
	seed := hex.EncodeToString(seedBytes)
	portA := vsockPort()
	portB := vsockPort()
	for portB == portA {
		portB = vsockPort()
	}
	a := startEnclave(t, portA, "--dev-key-seed", seed)
	b := startEnclave(t, portB, "--dev-key-seed", seed)
	p := startProxy(t, a.target, 2, "--upstream", b.target, "--log-level", "debug")
	c := dial(t, p.target, 2)

	// One keyset: the proxy's answer is each enclave's own.
	keys := keyIDs(t, c)
	for _, e := range []*enclave{a, b} {
		direct := keyIDs(t, dial(t, e.target, 1))
		for typ, k := range keys {
			if direct[typ].GetKeyId() != k.GetKeyId() {
				t.Fatalf("enclave %s: %s key %s, the proxy's %s", e.target, sigalg.TypeName(typ), direct[typ].GetKeyId(), k.GetKeyId())
			}
		}
	}
	for _, e := range []*enclave{a, b} {
		if !strings.Contains(e.out.String(), "DEVELOPMENT ONLY: keys derived from --dev-key-seed") {
			t.Fatalf("enclave %s did not warn about its derived keys", e.target)
		}
		if strings.Contains(e.out.String(), seed) || strings.Contains(strings.ToUpper(e.out.String()), strings.ToUpper(seed[:16])) {
			t.Fatalf("enclave %s printed its seed", e.target)
		}
	}

	stop := make(chan struct{})
	load := &multiLoad{}
	wg := load.run(c, keys[pb.KeyType_KEY_TYPE_ECC], 4, 10*time.Second*scale, stop)
	stopped := false
	defer func() {
		if !stopped {
			close(stop)
			wg.Wait()
		}
	}()
	progress := func(what string, n int64) {
		t.Helper()
		from := load.ok.Load()
		waitFor(t, what, 30*time.Second*scale, func() bool { return load.ok.Load() >= from+n })
	}

	// Spread: both enclaves sign.
	progress("calls through the proxy", 40)
	signsA, signsB := enclaveSigns(t, a.target), enclaveSigns(t, b.target)
	t.Logf("spread: enclave A signed %d, B %d; %s", signsA, signsB, load)
	if signsA == 0 || signsB == 0 {
		t.Fatalf("calls not spread over the enclaves: A signed %d, B %d", signsA, signsB)
	}

	// A drains (SIGTERM) under load and exits 0; the calls go on.
	a.signal(syscall.SIGTERM)
	if code := a.wait(t, 40*time.Second*scale); code != 0 {
		t.Fatalf("enclave A exited %d after SIGTERM, want 0", code)
	}
	if !strings.Contains(a.out.String(), `"msg":"drained"`) {
		t.Fatal("enclave A did not log a clean drain")
	}
	progress("calls while A is away", 20)
	if f := load.failures(); len(f) != 0 || load.wrong.Load() != 0 {
		t.Fatalf("A's drain cost calls: %s (first wrong: %s)", load, load.firstBad)
	}
	t.Logf("A drained: %s", load)

	// A again, same seed, same port: it takes calls again.
	a = startEnclave(t, portA, "--dev-key-seed", seed)
	waitFor(t, "calls on the restarted enclave A", 60*time.Second*scale, func() bool { return enclaveSigns(t, a.target) >= 10 })

	// B dies (SIGKILL) under load.
	b.kill()
	progress("calls after B was killed", 40)
	close(stop)
	wg.Wait()
	stopped = true
	t.Logf("after B was killed: %s; restarted A signed %d", load, enclaveSigns(t, a.target))

	if load.wrong.Load() != 0 {
		t.Fatalf("%d wrong signatures (first: %s)", load.wrong.Load(), load.firstBad)
	}
	if len(load.failures()) > 0 {
		t.Fatalf("calls failed: %s", load)
	}

	// The proxy's logs name both upstreams.
	seen := map[string]bool{}
	for _, l := range p.logLines("upstream health") {
		if up, ok := l["upstream"].(string); ok {
			seen[up] = true
		}
	}
	for _, e := range []string{a.target, b.target} {
		if !seen[e] {
			t.Errorf("no \"upstream health\" log line of the proxy names %s (named: %v)", e, seen)
		}
	}
	relaunched := len(p.logLines("call relaunched on another upstream connection"))
	t.Logf("%d calls signed and verified, none failed; the proxy relaunched %d calls; its health lines name %v",
		load.ok.Load(), relaunched, seen)
}
