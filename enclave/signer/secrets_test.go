package signer_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.uber.org/fx"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/nitrosign/nitrosign/enclave"
	"github.com/nitrosign/nitrosign/enclave/enclavetest"
	"github.com/nitrosign/nitrosign/enclave/logship"
	"github.com/nitrosign/nitrosign/enclave/signer"
	"github.com/nitrosign/nitrosign/host/enclavelog"
	"github.com/nitrosign/nitrosign/host/proxy"
	"github.com/nitrosign/nitrosign/internal/sigalg"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// secrets is every byte string that must never reach a log line, each
// with a name for the failure message.
type secrets struct {
	names  []string
	values [][]byte
}

func (s *secrets) add(name string, b []byte) {
	if len(b) < 8 { // too short to search for without false alarms
		return
	}
	s.names = append(s.names, name)
	s.values = append(s.values, bytes.Clone(b))
}

// addForms adds b as it is and in every text form a logger could give it:
// hex (both cases), base64 (standard, URL, padded or not).
func (s *secrets) addForms(name string, b []byte) {
	s.add(name, b)
	s.add(name+" (hex)", []byte(hex.EncodeToString(b)))
	s.add(name+" (HEX)", []byte(strings.ToUpper(hex.EncodeToString(b))))
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		s.add(name+" (base64)", []byte(enc.EncodeToString(b)))
	}
}

// addKeyMaterial adds a private number: its bytes in every form, every
// 16-byte window of them in hex (a partial leak), and its decimal text.
func (s *secrets) addKeyMaterial(name string, n *big.Int, size int) {
	b := n.FillBytes(make([]byte, size))
	s.addForms(name, b)
	for i := 0; i+16 <= len(b); i += 8 {
		s.add(fmt.Sprintf("%s bytes %d-%d (hex)", name, i, i+16), []byte(hex.EncodeToString(b[i:i+16])))
	}
	s.add(name+" (decimal)", []byte(n.String()))
}

func (s *secrets) addPrivateKey(id string, k crypto.Signer) error {
	switch k := k.(type) {
	case *ecdsa.PrivateKey:
		d, err := k.Bytes()
		if err != nil {
			return err
		}
		s.addKeyMaterial("ECDSA D of "+id, new(big.Int).SetBytes(d), len(d))
	case *rsa.PrivateKey:
		size := k.Size()
		s.addKeyMaterial("RSA D of "+id, k.D, size)
		for i, p := range k.Primes {
			s.addKeyMaterial(fmt.Sprintf("RSA prime %d of %s", i, id), p, size/2)
		}
		s.addKeyMaterial("RSA Dp of "+id, k.Precomputed.Dp, size/2)
		s.addKeyMaterial("RSA Dq of "+id, k.Precomputed.Dq, size/2)
		s.addKeyMaterial("RSA Qinv of "+id, k.Precomputed.Qinv, size/2)
	case ed25519.PrivateKey:
		s.addForms("Ed25519 seed of "+id, k.Seed())
		s.addForms("Ed25519 private key of "+id, k)
	default:
		return fmt.Errorf("key %s: unexpected private key type %T", id, k)
	}
	// The key's PKCS #8 DER, in the base64 a PEM file would carry.
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return err
	}
	s.addForms("PKCS #8 of "+id, der)
	return nil
}

// find returns the name of the first secret in line, if any.
func (s *secrets) find(line []byte) (string, bool) {
	for i, v := range s.values {
		if bytes.Contains(line, v) {
			return s.names[i], true
		}
	}
	return "", false
}

// run starts the real enclave graph and the binary's proxy graph on TCP
// loopback, both logging everything at debug level into observers.
func run(t *testing.T, c enclave.Config) (sg *signer.Signer, enclaveAddr, proxyAddr string, logs func() []observer.LoggedEntry, stop func()) {
	t.Helper()
	encCore, encLogs := observer.New(zapcore.DebugLevel)
	// The enclave's lines also travel the way a production enclave's do,
	// shipped (logship) to the host's receiver (enclavelog), whose output
	// the guard checks too.
	hostCore, hostLogs := observer.New(zapcore.DebugLevel)
	recv := enclavelog.New(enclavelog.Config{}, zap.New(hostCore))
	rl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	recvDone := make(chan struct{})
	go func() {
		defer close(recvDone)
		_ = recv.Serve(rl)
	}()
	ship, err := logship.New(logship.Config{Dial: func(ctx context.Context) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", rl.Addr().String())
	}})
	if err != nil {
		t.Fatal(err)
	}
	el, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	encApp := fx.New(enclave.Options(c, zap.New(zapcore.NewTee(encCore, ship.Core(zapcore.DebugLevel)))),
		fx.Supply(fx.Annotate(el, fx.As(new(net.Listener)))), fx.Populate(&sg))
	pxCore, pxLogs := observer.New(zapcore.DebugLevel)
	pl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := proxy.DefaultConfig()
	cfg.Upstreams = []string{"tcp://" + el.Addr().String()}
	cfg.Pool.Size = 2
	cfg.Log.Level = "debug"
	pxApp := fx.New(proxy.Options(cfg), fx.Provide(func() net.Listener { return pl }),
		fx.Decorate(func() *zap.Logger { return zap.New(pxCore) }))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := encApp.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := pxApp.Start(ctx); err != nil {
		t.Fatal(err)
	}
	var once bool
	stop = func() {
		if once {
			return
		}
		once = true
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = pxApp.Stop(ctx)
		_ = encApp.Stop(ctx)
		_ = ship.Close(ctx)
		// Every line the enclave wrote reached the host before it closes.
		for hostLogs.Len() < int(ship.Shipped()) && ctx.Err() == nil {
			time.Sleep(5 * time.Millisecond)
		}
		_ = rl.Close()
		<-recvDone
		recv.Close()
	}
	t.Cleanup(stop)
	shipped := func() []observer.LoggedEntry {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if !once {
			if err := ship.Flush(ctx); err != nil {
				t.Fatalf("shipping the enclave's lines: %v", err)
			}
		}
		for hostLogs.Len() < int(ship.Shipped()) && ctx.Err() == nil {
			time.Sleep(5 * time.Millisecond)
		}
		if ship.Dropped() > 0 || hostLogs.Len() < int(ship.Shipped()) {
			t.Fatalf("the host got %d of %d shipped lines (%d dropped)", hostLogs.Len(), ship.Shipped(), ship.Dropped())
		}
		return hostLogs.All()
	}
	return sg, el.Addr().String(), pl.Addr().String(),
		func() []observer.LoggedEntry {
			return append(append(encLogs.All(), pxLogs.All()...), shipped()...)
		}, stop
}

func dial(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

func marker(what string) []byte {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return fmt.Appendf(nil, "SECRET-%s-%x", what, b)
}

// A full signing session (every key and algorithm, RAW and DIGEST,
// attestation with a nonce and user data, Echo, caller mistakes, an
// authorization header) directly and through the proxy, with debug logging
// on both: no log line carries key material, message bytes, digests,
// signatures, nonces, user data or metadata values, in any encoding; no
// error message carries message bytes; no answer carries key material.
// It runs with random keys and with keys derived from a development seed
// (--dev-key-seed), which must not appear anywhere either.
func TestNoSecretsInLogsOrAnswers(t *testing.T) {
	for _, seeded := range []bool{false, true} {
		name := "random keys"
		if seeded {
			name = "dev key seed"
		}
		t.Run(name, func(t *testing.T) { testNoSecrets(t, seeded) })
	}
}

func testNoSecrets(t *testing.T, seeded bool) {
	c := enclavetest.DefaultConfig()
	var seed []byte
	if seeded {
		seed = make([]byte, signer.DevKeySeedSize)
		_, _ = rand.Read(seed)
		c.Signer.DevKeySeed = seed
	}
	sg, enclaveAddr, proxyAddr, logs, stop := run(t, c)
	var sec secrets
	if seeded {
		// Key material too: no answer may carry the seed.
		sec.addForms("dev key seed", seed)
		for i := 0; i+8 <= len(seed); i += 4 {
			sec.add(fmt.Sprintf("dev key seed bytes %d-%d (hex)", i, i+8), []byte(hex.EncodeToString(seed[i:i+8])))
		}
	}
	for id, k := range signer.PrivateKeys(sg) {
		if err := sec.addPrivateKey(id, k); err != nil {
			t.Fatal(err)
		}
	}
	keyMaterial := len(sec.values) // the secrets no answer may carry either
	sec.add("PEM label", []byte("PRIVATE KEY"))

	var answers [][]byte // every response, marshalled
	keep := func(m proto.Message) {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		answers = append(answers, b)
	}
	calls := 0
	for _, end := range []struct{ name, addr string }{{"enclave", enclaveAddr}, {"proxy", proxyAddr}} {
		cc := dial(t, end.addr)
		authz := marker("AUTHZ")
		sec.addForms("authorization header", authz)
		ctx := func() context.Context {
			c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			t.Cleanup(cancel)
			return metadata.AppendToOutgoingContext(c, "authorization", "Bearer "+string(authz))
		}
		signerc := pb.NewSignerServiceClient(cc)
		keys, err := signerc.ListKeys(ctx(), &pb.ListKeysRequest{})
		if err != nil {
			t.Fatal(err)
		}
		keep(keys)
		if len(keys.GetKeys()) != 3 {
			t.Fatalf("%d keys, want 3", len(keys.GetKeys()))
		}
		for _, k := range keys.GetKeys() {
			pk, err := signerc.GetPublicKey(ctx(), &pb.GetPublicKeyRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: k.GetKeyId()}}})
			if err != nil {
				t.Fatal(err)
			}
			keep(pk)
			pub, err := x509.ParsePKIXPublicKey(k.GetPublicKey())
			if err != nil {
				t.Fatal(err)
			}
			for _, alg := range k.GetSigningAlgorithms() {
				for _, mt := range []pb.MessageType{pb.MessageType_MESSAGE_TYPE_RAW, pb.MessageType_MESSAGE_TYPE_DIGEST} {
					if mt == pb.MessageType_MESSAGE_TYPE_DIGEST && alg == pb.SigningAlgorithm_SIGNING_ALGORITHM_ED25519_SHA_512 {
						continue
					}
					msg := marker("MESSAGE")
					sec.addForms("message", msg)
					in := msg
					if h, ok := sigalg.Hash(alg); ok && h != 0 {
						hh := h.New()
						hh.Write(msg)
						sec.addForms("digest of a message", hh.Sum(nil))
						if mt == pb.MessageType_MESSAGE_TYPE_DIGEST {
							in = hh.Sum(nil)
						}
					}
					resp, err := signerc.Sign(ctx(), &pb.SignRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: k.GetKeyId()}},
						Message: in, MessageType: mt, SigningAlgorithm: alg})
					if err != nil {
						t.Fatalf("%s %s %s: %v", end.name, sigalg.Name(alg), mt, err)
					}
					if err := sigalg.Verify(pub, alg, pb.MessageType_MESSAGE_TYPE_RAW, msg, resp.GetSignature()); err != nil {
						t.Fatalf("%s %s %s: %v", end.name, sigalg.Name(alg), mt, err)
					}
					sec.addForms("signature", resp.GetSignature())
					keep(resp)
					calls++
				}
			}
		}
		// Caller mistakes whose request carries secret bytes: the error
		// names the field and the size, never the bytes.
		for _, req := range []*pb.SignRequest{
			{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_ECC}}, Message: bytes.Repeat(marker("LONG"), 200)},
			{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_ECC}}, Message: marker("DIGEST"), MessageType: pb.MessageType_MESSAGE_TYPE_DIGEST},
			{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_RSA}}, Message: marker("BADALG"), SigningAlgorithm: pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_384},
		} {
			sec.addForms("message of a refused request", req.GetMessage())
			_, err := signerc.Sign(ctx(), req)
			if status.Code(err) == 0 {
				t.Fatal("a bad request was signed")
			}
			if name, leak := sec.find([]byte(status.Convert(err).Message())); leak {
				t.Fatalf("error message %q carries %s", status.Convert(err).Message(), name)
			}
		}
		nonce, userData := marker("NONCE"), marker("USERDATA")
		sec.addForms("attestation nonce", nonce)
		sec.addForms("attestation user data", userData)
		att := pb.NewAttestationServiceClient(cc)
		for _, req := range []*pb.AttestRequest{{}, {Nonce: nonce, UserData: userData}} {
			resp, err := att.Attest(ctx(), req)
			if err != nil {
				t.Fatal(err)
			}
			keep(resp)
		}
		payload := marker("ECHO")
		sec.addForms("echo payload", payload)
		if _, err := pb.NewEchoServiceClient(cc).Echo(ctx(), &pb.EchoRequest{Payload: payload}); err != nil {
			t.Fatal(err)
		}
	}
	if calls < 20 {
		t.Fatalf("only %d signatures made", calls)
	}
	stop() // flush: every line is in

	entries := logs()
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	debugCalls := 0
	for _, e := range entries {
		if e.Level == zapcore.DebugLevel && e.Message == "call" {
			debugCalls++
		}
		buf, err := enc.EncodeEntry(e.Entry, e.Context)
		if err != nil {
			t.Fatal(err)
		}
		line := buf.Bytes()
		// The raw field values too: a binary field is base64 in JSON,
		// a byte string escaped; both forms are searched.
		for _, f := range e.Context {
			switch v := f.Interface.(type) {
			case []byte:
				line = append(line, v...)
			case fmt.Stringer:
				line = append(line, v.String()...)
			}
			line = append(line, f.String...)
		}
		if name, leak := sec.find(line); leak {
			t.Fatalf("a log line carries %s:\n%s", name, buf.String())
		}
		buf.Free()
	}
	// Debug logging was really on, on both sides: every call is logged
	// (the enclave's and the proxy's call lines).
	if debugCalls < 2*calls {
		t.Fatalf("%d debug call lines for %d signatures through two ends: was debug logging on?", debugCalls, calls)
	}
	if seeded {
		warned := false
		for _, e := range entries {
			warned = warned || (e.Level == zapcore.WarnLevel && strings.Contains(e.Message, "DEVELOPMENT ONLY: keys derived from --dev-key-seed"))
		}
		if !warned {
			t.Fatal("no development warning for the seeded keys")
		}
	}
	t.Logf("%d log lines from the enclave, the proxy and the host's receiver of the enclave's shipped lines (%d debug call lines), %d signatures, %d secret forms searched: none found",
		len(entries), debugCalls, calls, len(sec.values))

	// No answer carries private key material.
	km := secrets{names: sec.names[:keyMaterial], values: sec.values[:keyMaterial]}
	for _, a := range answers {
		if name, leak := km.find(a); leak {
			t.Fatalf("an answer carries %s", name)
		}
	}
}

// No code linked into the shipped binaries serialises a private key: a
// simple, honest guard over their non-test Go files (the module's own
// packages, found with `go list -deps`), looking for the standard library's
// private key encoders, PEM private key labels and raw key component
// accessors. A new legitimate use must be argued for here.
func TestNoPrivateKeySerialisation(t *testing.T) {
	// go test puts its own GOROOT/bin first on the test's PATH.
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("no go tool on PATH (%v): the guard needs `go list`", err)
	}
	root := moduleRoot(t)
	cmd := exec.Command(goTool, "list", "-deps", "-f",
		`{{if .Module}}{{if eq .Module.Path "github.com/nitrosign/nitrosign"}}{{range .GoFiles}}{{$.Dir}}/{{.}}{{"\n"}}{{end}}{{end}}{{end}}`,
		"./enclave/cmd/nitrosign-enclave", "./host/cmd/nitrosign-proxy", "./host/cmd/nitrosign")
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	forbidden := regexp.MustCompile(`MarshalPKCS8PrivateKey|MarshalECPrivateKey|MarshalPKCS1PrivateKey|PRIVATE KEY|\.Seed\(\)|\.Primes\b|\.Precomputed\b|EncryptPEMBlock`)
	files := strings.Fields(string(out))
	if len(files) < 20 {
		t.Fatalf("go list found only %d files: %s", len(files), out)
	}
	// The uses argued for, by file: what each one serialises or reads,
	// and why that is not a leak.
	allowed := map[string]map[string]string{
		// Seal: the keyset body, encrypted with AES-256-GCM under a data
		// key from KMS before Seal returns; the clear bytes are zeroed.
		"enclave/sealing/keyset.go": {"MarshalPKCS8PrivateKey": "sealed keyset body"},
		// The session ticket key: the oldest key's PKCS#8 bytes are the
		// input of HKDF-SHA256 and zeroed at once; only the derived
		// secret is kept, in the enclave.
		"enclave/signer/signer.go": {"MarshalPKCS8PrivateKey": "HKDF input of the session ticket key"},
		// The simulated NSM reads a development root's key (PEM label
		// "PRIVATE KEY") given by --dev-simulated-nsm-root: development
		// only, and it is a test CA's key, not a signing key.
		"enclave/attest/simulated.go": {"PRIVATE KEY": "development root, read only"},
		// A caller's own identity (nitrosign identity create, --identity):
		// made, saved (0600) and read by the caller's CLI on the caller's
		// machine; never a key the enclave holds.
		"internal/callauth/identity.go": {"PRIVATE KEY": "caller identity file", "MarshalPKCS8PrivateKey": "caller identity file"},
		"internal/callauth/doc.go":      {"PRIVATE KEY": "documentation of the identity file"},
	}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		src, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, line := range strings.Split(string(src), "\n") {
			if m := forbidden.FindString(line); m != "" {
				rel, _ := filepath.Rel(root, f)
				if _, ok := allowed[rel][m]; ok {
					continue
				}
				t.Errorf("%s:%d uses %q: shipped code must not serialise private keys", rel, i+1, m)
			}
		}
	}
	t.Logf("%d Go files of the three binaries searched", len(files))
}

func moduleRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test's directory")
		}
		dir = parent
	}
}
