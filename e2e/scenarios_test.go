package e2e

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mdlayher/vsock"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/host/client"
	"github.com/nitrosign/nitrosign/internal/sigalg"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Scenario 1: Echo and Sign with every key type and algorithm, directly over
// vsock and through the proxy; every signature verifies against the served
// public key. The CLI binary signs and verifies through the proxy too.
func TestEchoAndSignBothEnds(t *testing.T) {
	e := startEnclave(t, vsockPort())
	p := startProxy(t, e.target, 2)
	msg := []byte("end to end over AF_VSOCK")
	for _, end := range []struct{ name, target string }{{"direct-vsock", e.target}, {"proxy", p.target}} {
		t.Run(end.name, func(t *testing.T) {
			c := dial(t, end.target, 1)
			payload := bytes.Repeat([]byte("echo"), 1000)
			resp, err := c.Echo.Echo(callCtx(t), &pb.EchoRequest{Payload: payload})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(resp.Payload, payload) {
				t.Fatal("echo payload changed")
			}
			keys, err := c.Signer.ListKeys(callCtx(t), &pb.ListKeysRequest{})
			if err != nil {
				t.Fatal(err)
			}
			if len(keys.Keys) != 3 {
				t.Fatalf("%d keys, want 3", len(keys.Keys))
			}
			signed := 0
			for _, k := range keys.Keys {
				pub, err := x509.ParsePKIXPublicKey(k.PublicKey)
				if err != nil {
					t.Fatal(err)
				}
				for _, alg := range k.SigningAlgorithms {
					for _, mt := range []pb.MessageType{pb.MessageType_MESSAGE_TYPE_RAW, pb.MessageType_MESSAGE_TYPE_DIGEST} {
						if mt == pb.MessageType_MESSAGE_TYPE_DIGEST && alg == pb.SigningAlgorithm_SIGNING_ALGORITHM_ED25519_SHA_512 {
							continue
						}
						in := msg
						if mt == pb.MessageType_MESSAGE_TYPE_DIGEST {
							h, _ := sigalg.Hash(alg)
							hh := h.New()
							hh.Write(msg)
							in = hh.Sum(nil)
						}
						resp, err := c.Signer.Sign(callCtx(t), &pb.SignRequest{
							Key:     &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: k.KeyType}},
							Message: in, MessageType: mt, SigningAlgorithm: alg})
						if err != nil {
							t.Fatalf("%s %s: %v", sigalg.Name(alg), mt, err)
						}
						if resp.KeyId != k.KeyId || resp.SigningAlgorithm != alg {
							t.Fatalf("%s: answered by key %s with %s", sigalg.Name(alg), resp.KeyId, sigalg.Name(resp.SigningAlgorithm))
						}
						if err := sigalg.Verify(pub, alg, pb.MessageType_MESSAGE_TYPE_RAW, msg, resp.Signature); err != nil {
							t.Fatalf("%s %s: %v", sigalg.Name(alg), mt, err)
						}
						signed++
					}
				}
			}
			t.Logf("%s: %d signatures verified", end.name, signed)
		})
	}
	t.Run("cli-through-proxy", func(t *testing.T) {
		sig, err := cli(t, "hello", "sign", "--target", p.target, "--key-type", "ecc")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := cli(t, "hello", "verify", "--target", e.target, "--key-type", "ecc", "--signature", strings.TrimSpace(sig)); err != nil {
			t.Fatalf("signature made through the proxy does not verify with the key served directly: %v", err)
		}
		if _, err := cli(t, "hellO", "verify", "--target", p.target, "--key-type", "ecc", "--signature", strings.TrimSpace(sig)); err == nil {
			t.Fatal("verify accepted a tampered message")
		}
	})
}

// Scenario 2: grpc.health.v1 on both ends; reflection through the proxy
// lists the enclave's services.
func TestHealthAndReflection(t *testing.T) {
	e := startEnclave(t, vsockPort())
	p := startProxy(t, e.target, 2)
	for _, target := range []string{e.target, p.target} {
		c := dial(t, target, 1)
		for _, svc := range []string{"", "nitrosign.v1.SignerService"} {
			resp, err := c.Health.Check(callCtx(t), &healthpb.HealthCheckRequest{Service: svc})
			if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
				t.Fatalf("%s health %q: %v %v", target, svc, resp, err)
			}
		}
	}
	c := dial(t, p.target, 1)
	stream, err := reflectionpb.NewServerReflectionClient(c.Conn()).ServerReflectionInfo(callCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	_ = stream.CloseSend()
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.Name)
	}
	sort.Strings(names)
	want := []string{"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "nitrosign.v1.AttestationService", "nitrosign.v1.EchoService", "nitrosign.v1.SignerService"}
	for _, w := range want {
		if i := sort.SearchStrings(names, w); i == len(names) || names[i] != w {
			t.Fatalf("reflection through the proxy lists %v, missing %s", names, w)
		}
	}
}

// keyCache verifies every signature against the key it names, fetching
// unknown keys (a restarted enclave has new ones) through the same client.
type keyCache struct {
	mu   sync.Mutex
	keys map[string]crypto.PublicKey
}

func (k *keyCache) verify(ctx context.Context, c *client.Client, msg []byte, resp *pb.SignResponse) error {
	k.mu.Lock()
	pub, ok := k.keys[resp.KeyId]
	k.mu.Unlock()
	if !ok {
		r, err := c.Signer.GetPublicKey(ctx, &pb.GetPublicKeyRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: resp.KeyId}}})
		if err != nil {
			return fmt.Errorf("fetch key %s: %w", resp.KeyId, err)
		}
		if pub, err = x509.ParsePKIXPublicKey(r.Key.PublicKey); err != nil {
			return err
		}
		k.mu.Lock()
		k.keys[resp.KeyId] = pub
		k.mu.Unlock()
	}
	return sigalg.Verify(pub, resp.SigningAlgorithm, pb.MessageType_MESSAGE_TYPE_RAW, msg, resp.Signature)
}

// loadResult counts the outcomes of a load run.
type loadResult struct {
	ok, wrong     atomic.Int64
	codes         sync.Map // codes.Code -> *atomic.Int64
	overDeadline  atomic.Int64
	firstWrongErr atomic.Value
}

func (r *loadResult) fail(code codes.Code) {
	v, _ := r.codes.LoadOrStore(code, new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
}

func (r *loadResult) count(code codes.Code) int64 {
	if v, ok := r.codes.Load(code); ok {
		return v.(*atomic.Int64).Load()
	}
	return 0
}

func (r *loadResult) String() string {
	s := fmt.Sprintf("ok=%d wrong=%d over-deadline=%d", r.ok.Load(), r.wrong.Load(), r.overDeadline.Load())
	r.codes.Range(func(k, v any) bool {
		s += fmt.Sprintf(" %s=%d", k.(codes.Code), v.(*atomic.Int64).Load())
		return true
	})
	return s
}

// signLoad runs workers that sign and verify until stop is closed.
func signLoad(c *client.Client, workers int, deadline time.Duration, stop <-chan struct{}, res *loadResult, kt pb.KeyType) *sync.WaitGroup {
	kc := &keyCache{keys: map[string]crypto.PublicKey{}}
	var wg sync.WaitGroup
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
				msg := fmt.Appendf(nil, "worker %d call %d", w, i)
				ctx, cancel := context.WithTimeout(context.Background(), deadline)
				start := time.Now()
				resp, err := c.Signer.Sign(ctx, &pb.SignRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: kt}}, Message: msg})
				if time.Since(start) > deadline+time.Second*scale {
					res.overDeadline.Add(1)
				}
				if err != nil {
					res.fail(status.Code(err))
					cancel()
					time.Sleep(5 * time.Millisecond)
					continue
				}
				if verr := kc.verify(ctx, c, msg, resp); verr != nil {
					res.wrong.Add(1)
					res.firstWrongErr.CompareAndSwap(nil, verr.Error())
				} else {
					res.ok.Add(1)
				}
				cancel()
			}
		}()
	}
	return &wg
}

// Scenario 3: the enclave is killed under load from the proxy: calls fail
// fast with Unavailable and none hangs past its deadline; the enclave is
// restarted on the same port: the same proxy process serves again within a
// few seconds; no request is answered wrongly.
func TestEnclaveRestartUnderLoad(t *testing.T) {
	port := vsockPort()
	e := startEnclave(t, port)
	p := startProxy(t, e.target, 4)
	c := dial(t, p.target, 2)

	stop := make(chan struct{})
	res := &loadResult{}
	deadline := 2 * time.Second * scale
	wg := signLoad(c, 8, deadline, stop, res, pb.KeyType_KEY_TYPE_ECC)
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	}()

	waitFor(t, "calls to succeed before the kill", 10*time.Second*scale, func() bool { return res.ok.Load() > 50 })
	e.kill()
	killedAt := time.Now()
	okAtKill := res.ok.Load()
	// While the enclave is down, calls fail with Unavailable.
	waitFor(t, "Unavailable while the enclave is down", 5*time.Second*scale, func() bool { return res.count(codes.Unavailable) > 20 })
	t.Logf("enclave down for %s: %s", time.Since(killedAt).Round(time.Millisecond), res)

	e2 := startEnclave(t, port)
	servingAt := time.Now()
	waitFor(t, "the proxy to serve again after the enclave restart", 10*time.Second*scale, func() bool { return res.ok.Load() > okAtKill+50 })
	t.Logf("proxy served again %s after the restarted enclave reported SERVING", time.Since(servingAt).Round(time.Millisecond))
	close(stop)
	wg.Wait()
	_ = e2

	t.Logf("result: %s", res)
	if res.wrong.Load() != 0 {
		t.Fatalf("%d calls answered wrongly (first: %v)", res.wrong.Load(), res.firstWrongErr.Load())
	}
	if res.overDeadline.Load() != 0 {
		t.Fatalf("%d calls hung past their deadline", res.overDeadline.Load())
	}
	res.codes.Range(func(k, v any) bool {
		if code := k.(codes.Code); code != codes.Unavailable && code != codes.DeadlineExceeded {
			t.Errorf("%d calls failed with %s", v.(*atomic.Int64).Load(), code)
		}
		return true
	})
	if n := res.count(codes.DeadlineExceeded); n > res.count(codes.Unavailable)/10 {
		t.Fatalf("calls did not fail fast: %d DeadlineExceeded against %d Unavailable", n, res.count(codes.Unavailable))
	}
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Scenario 4: SIGTERM to the enclave during load: in-flight calls complete,
// new ones are refused, the process exits 0.
func TestGracefulStopUnderLoad(t *testing.T) {
	e := startEnclave(t, vsockPort(), "--graceful-timeout", "30s")
	c := dial(t, e.target, 2)
	stop := make(chan struct{})
	res := &loadResult{}
	wg := signLoad(c, 8, 10*time.Second*scale, stop, res, pb.KeyType_KEY_TYPE_RSA)
	waitFor(t, "calls to succeed", 10*time.Second*scale, func() bool { return res.ok.Load() > 20 })
	e.signal(syscall.SIGTERM)
	code := e.wait(t, 40*time.Second*scale)
	close(stop)
	wg.Wait()
	t.Logf("after SIGTERM: exit %d, %s", code, res)
	if code != 0 {
		t.Fatalf("enclave exited %d after SIGTERM, want 0", code)
	}
	if res.wrong.Load() != 0 {
		t.Fatalf("%d calls answered wrongly", res.wrong.Load())
	}
	// Calls in flight at SIGTERM completed; calls after it were refused
	// with Unavailable. Nothing was cut off mid-call.
	res.codes.Range(func(k, v any) bool {
		if code := k.(codes.Code); code != codes.Unavailable {
			t.Errorf("%d calls failed with %s: in-flight calls must complete", v.(*atomic.Int64).Load(), code)
		}
		return true
	})
	if res.count(codes.Unavailable) == 0 {
		t.Fatal("no call was refused after SIGTERM")
	}
	if !strings.Contains(e.out.String(), `"msg":"drained"`) {
		t.Fatal("the enclave did not log a clean drain")
	}
}

// Scenario 5: 64 concurrent callers over the proxy, thousands of calls, zero
// errors, and the proxy's pool spreads them over its vsock connections (as
// the enclave sees them: distinct peer ports in its debug call log).
func TestConcurrencyThroughProxy(t *testing.T) {
	const (
		poolSize = 4
		callers  = 64
		perCall  = 40
	)
	e := startEnclave(t, vsockPort(), "--log-level", "debug")
	p := startProxy(t, e.target, poolSize)
	c := dial(t, p.target, 4)
	var wg sync.WaitGroup
	var errs atomic.Int64
	var firstErr atomic.Value
	for w := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perCall {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second*scale)
				var err error
				if i%2 == 0 {
					var r *pb.EchoResponse
					payload := fmt.Appendf(nil, "%d/%d", w, i)
					r, err = c.Echo.Echo(ctx, &pb.EchoRequest{Payload: payload})
					if err == nil && !bytes.Equal(r.Payload, payload) {
						err = errors.New("echo answered with another caller's payload")
					}
				} else {
					_, err = c.Signer.Sign(ctx, &pb.SignRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_ECC}}, Message: []byte("m")})
				}
				cancel()
				if err != nil {
					errs.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				}
			}
		}()
	}
	wg.Wait()
	if errs.Load() != 0 {
		t.Fatalf("%d of %d calls failed (first: %v)", errs.Load(), callers*perCall, firstErr.Load())
	}
	// The enclave logs each call with its peer: one vsock connection per
	// pool member. Give the last log lines a moment to be written.
	var perPeer map[string]int
	waitFor(t, "the enclave's call log", 5*time.Second*scale, func() bool {
		perPeer = map[string]int{}
		total := 0
		for _, l := range e.logLines("call") {
			method, _ := l["method"].(string)
			if !strings.HasPrefix(method, "/nitrosign.v1.") {
				continue // the harness's own health probes come on their own connection
			}
			if peer, _ := l["peer"].(string); peer != "" {
				perPeer[peer]++
				total++
			}
		}
		return total >= callers*perCall
	})
	t.Logf("%d calls, enclave saw them on %d vsock connections: %v", callers*perCall, len(perPeer), perPeer)
	if len(perPeer) != poolSize {
		t.Fatalf("calls arrived on %d connections, want the proxy's pool of %d", len(perPeer), poolSize)
	}
	for peer, n := range perPeer {
		if n < callers*perCall/(poolSize*4) {
			t.Fatalf("connection %s carried only %d of %d calls: load not spread", peer, n, callers*perCall)
		}
	}
}

// Scenario 6: bad input over vsock: garbage bytes, HTTP/1.1, a half-sent
// preface, an oversized message, malformed protobuf and unknown enum values
// get a closed connection or a precise status; the enclave keeps serving.
func TestBadInputOverVsock(t *testing.T) {
	e := startEnclave(t, vsockPort())
	c := dial(t, e.target, 1)
	good := func() {
		t.Helper()
		if _, err := c.Echo.Echo(callCtx(t), &pb.EchoRequest{Payload: []byte("still here")}); err != nil {
			t.Fatalf("the enclave stopped serving: %v", err)
		}
	}
	for _, junk := range []struct {
		name string
		data []byte
	}{
		{"garbage", bytes.Repeat([]byte{0xde, 0xad, 0xbe, 0xef}, 4096)},
		{"http1", []byte("GET /nitrosign.v1.SignerService/ListKeys HTTP/1.1\r\nHost: enclave\r\n\r\n")},
		{"tls-client-hello", []byte{0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03}},
		{"half-preface", []byte("PRI * HTTP/2.0\r\n")},
	} {
		t.Run(junk.name, func(t *testing.T) {
			conn, err := vsock.Dial(1, e.port, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(20 * time.Second * scale))
			if _, err := conn.Write(junk.data); err != nil && !isClosedErr(err) {
				t.Fatal(err)
			}
			// The enclave closes the connection (after at most a GOAWAY);
			// a half-sent preface is dropped by the handshake timeout.
			if _, err := io.Copy(io.Discard, conn); err != nil && !isClosedErr(err) {
				t.Fatalf("connection not closed: %v", err)
			}
			good()
		})
	}
	ecc := &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_ECC}}
	for _, tc := range []struct {
		name string
		call func(ctx context.Context) error
		code codes.Code
	}{
		{"oversized", func(ctx context.Context) error {
			_, err := c.Echo.Echo(ctx, &pb.EchoRequest{Payload: make([]byte, 2<<20)})
			return err
		}, codes.ResourceExhausted},
		{"malformed-protobuf", func(ctx context.Context) error {
			return c.Conn().Invoke(ctx, "/nitrosign.v1.SignerService/Sign", rawBytes{0x0a, 0xff, 0x01}, &pb.SignResponse{}, grpc.ForceCodecV2(rawCodec{}))
		}, codes.InvalidArgument},
		{"unknown-enum", func(ctx context.Context) error {
			_, err := c.Signer.Sign(ctx, &pb.SignRequest{Key: ecc, Message: []byte("m"), SigningAlgorithm: 4242})
			return err
		}, codes.InvalidArgument},
		{"wrong-digest-length", func(ctx context.Context) error {
			_, err := c.Signer.Sign(ctx, &pb.SignRequest{Key: ecc, Message: []byte("short"), MessageType: pb.MessageType_MESSAGE_TYPE_DIGEST})
			return err
		}, codes.InvalidArgument},
		{"unknown-key", func(ctx context.Context) error {
			_, err := c.Signer.Sign(ctx, &pb.SignRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: strings.Repeat("0", 64)}}, Message: []byte("m")})
			return err
		}, codes.NotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call(callCtx(t))
			if status.Code(err) != tc.code {
				t.Fatalf("got %v, want %s", err, tc.code)
			}
			t.Logf("%s: %s", status.Code(err), status.Convert(err).Message())
			good()
		})
	}
}

func isClosedErr(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
