package e2e

import (
	"bytes"
	"context"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/fakes/devroot"
	"github.com/nitrosign/nitrosign/fakes/kmsfake"
	"github.com/nitrosign/nitrosign/internal/sigalg"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// sealedEnv is a test KMS (in this process, on TCP inside the VM), a
// proxy that serves the keyset file, the enclave's credentials and the
// KMS forwarder on vsock, and the flags of a sealed enclave that uses
// them: the production path end to end, with only the KMS our own.
type sealedEnv struct {
	kms      *kmsfake.Server
	proxy    *proxy
	keyset   string
	enclArgs []string
}

func newSealedEnv(t *testing.T) *sealedEnv {
	t.Helper()
	dir := t.TempDir()
	rootPEM, err := devroot.New()
	if err != nil {
		t.Fatal(err)
	}
	root, err := devroot.Root(rootPEM)
	if err != nil {
		t.Fatal(err)
	}
	rootFile, caFile := filepath.Join(dir, "dev-root.pem"), filepath.Join(dir, "kms-ca.pem")
	srv, err := kmsfake.Start(kmsfake.New(root, map[uint][]byte{0: attest.SimulatedPCRs()[0]}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	for f, b := range map[string][]byte{rootFile: rootPEM, caFile: srv.CAPEM} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// The proxy takes the instance role's credentials from the SDK's
	// default chain: here its environment.
	creds := kmsfake.Credentials()
	t.Setenv("AWS_ACCESS_KEY_ID", creds.AccessKeyID)
	t.Setenv("AWS_SECRET_ACCESS_KEY", creds.SecretAccessKey)
	t.Setenv("AWS_SESSION_TOKEN", creds.SessionToken)
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	ports := vsockPorts(3)
	hostPort, fwdPort, enclPort := ports[0], ports[1], ports[2]
	keyset := filepath.Join(dir, "keyset.sealed")
	// The proxy first: it keeps the keyset and relays KMS, so the enclave
	// needs it to start; it serves once the enclave does.
	addr := tcpAddr(t)
	p := &proxy{proc: start(t, "nitrosign-proxy", "--listen", addr, "--upstream", fmt.Sprintf("vsock://1:%d", enclPort), "--pool-size", "2",
		"--enclave-host-port", fmt.Sprint(hostPort), "--keyset-file", keyset,
		"--kms-forward-port", fmt.Sprint(fwdPort), "--kms-endpoint", srv.Addr), addr: addr, target: "tcp://" + addr}
	return &sealedEnv{kms: srv, proxy: p, keyset: keyset, enclArgs: []string{
		"--key-mode", "sealed", "--kms-key-arn", kmsfake.KeyARN,
		"--keyset-host", fmt.Sprintf("vsock://1:%d", hostPort),
		"--kms-proxy", fmt.Sprintf("vsock://1:%d", fwdPort),
		"--kms-ca-file", caFile, "--dev-simulated-nsm-root", rootFile, "--dev-allow-anonymous", "--audit-ship", "",
	}}
}

// firstPort is the port the proxy's upstream names.
func (s *sealedEnv) firstPort() uint32 {
	var port uint32
	for i, a := range s.proxy.cmd.Args {
		if a == "--upstream" {
			_, _ = fmt.Sscanf(s.proxy.cmd.Args[i+1], "vsock://1:%d", &port)
		}
	}
	return port
}

func sealedKeyIDs(t *testing.T, target string) []string {
	t.Helper()
	c := dial(t, target, 1)
	r, err := c.Signer.ListKeys(callCtx(t), &pb.ListKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, k := range r.GetKeys() {
		ids = append(ids, k.GetKeyId())
	}
	return ids
}

// notServingReason waits until target answers NOT_SERVING with a reason
// containing want on its health trailer, and returns the reason.
func notServingReason(t *testing.T, target string, p *proc, want string) string {
	t.Helper()
	c := dial(t, target, 1)
	deadline := time.Now().Add(20 * time.Second * scale)
	last := ""
	for time.Now().Before(deadline) {
		select {
		case <-p.done:
			t.Fatalf("%s exited: %v\n%s", p.name, p.err, tail(p.out.String(), 40))
		default:
		}
		var tr metadata.MD
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second*scale)
		r, err := c.Health.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Trailer(&tr))
		cancel()
		if err == nil {
			if r.GetStatus() == healthpb.HealthCheckResponse_SERVING {
				t.Fatalf("%s is SERVING; want NOT_SERVING because of %q", target, want)
			}
			if v := tr.Get("nitrosign-not-ready"); len(v) > 0 {
				last = v[0]
				if strings.Contains(last, want) {
					return last
				}
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("%s: last reason %q, want one with %q", target, last, want)
	return ""
}

// A sealed enclave keeps its keys across a restart, on real vsock, with
// the keyset kept by the proxy and KMS reached through the proxy's
// forwarder: the same key ids, and a signature made before the restart
// verifies with the public key served after it. A second enclave with
// the same measurements serves the same keyset. An enclave the key
// policy does not admit does not serve, and says why.
func TestSealedKeysetSurvivesRestart(t *testing.T) {
	s := newSealedEnv(t)
	port := s.firstPort()
	target := fmt.Sprintf("vsock://1:%d", port)

	// No keyset and no init: the enclave waits and says why.
	e := &enclave{proc: start(t, "nitrosign-enclave", append([]string{"--cid", "1", "--port", fmt.Sprint(port), "--dev-simulated-nsm"}, s.enclArgs...)...), port: port, target: target}
	reason := notServingReason(t, target, e.proc, "nitrosign keyset init")
	t.Logf("before init, health says: %s", reason)
	if out, err := cli(t, "", "keyset", "init", "--file", s.keyset); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("nitrosign keyset init: %s", strings.TrimSpace(out))
	}
	waitServing(t, target, e.proc)
	waitServing(t, s.proxy.target, s.proxy.proc)
	before := sealedKeyIDs(t, s.proxy.target)
	t.Logf("keys after init: %v", before)
	c := dial(t, s.proxy.target, 1)
	msg := []byte("signed before the restart")
	sig, err := c.Signer.Sign(callCtx(t), &pb.SignRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_ECC}}, Message: msg})
	if err != nil {
		t.Fatal(err)
	}
	stored, err := os.ReadFile(s.keyset)
	if err != nil {
		t.Fatalf("the proxy did not store the sealed keyset: %v", err)
	}

	// Restart the enclave on the same port: the proxy reconnects by itself.
	e.signal(syscall.SIGTERM)
	if code := e.wait(t, 30*time.Second*scale); code != 0 {
		t.Fatalf("enclave exit status %d", code)
	}
	e2 := startEnclave(t, port, s.enclArgs...)
	waitServing(t, s.proxy.target, s.proxy.proc)
	after := sealedKeyIDs(t, s.proxy.target)
	t.Logf("keys after the restart: %v", after)
	if !slices.Equal(before, after) {
		t.Fatalf("the restart changed the keys: %v, then %v", before, after)
	}
	k, err := c.Signer.GetPublicKey(callCtx(t), &pb.GetPublicKeyRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: sig.GetKeyId()}}})
	if err != nil {
		t.Fatal(err)
	}
	pub, err := x509.ParsePKIXPublicKey(k.GetKey().GetPublicKey())
	if err != nil {
		t.Fatal(err)
	}
	if err := sigalg.Verify(pub, sig.GetSigningAlgorithm(), pb.MessageType_MESSAGE_TYPE_RAW, msg, sig.GetSignature()); err != nil {
		t.Fatalf("the signature from before the restart does not verify with the key after it: %v", err)
	}
	t.Logf("signature by %s from before the restart verifies with the key served after it", sig.GetKeyId())
	if now, _ := os.ReadFile(s.keyset); !bytes.Equal(now, stored) {
		t.Fatal("the restart rewrote the sealed keyset")
	}

	// A second enclave with the same measurements: the same keyset.
	second := startEnclave(t, vsockPort(), s.enclArgs...)
	if ids := sealedKeyIDs(t, second.target); !slices.Equal(ids, before) {
		t.Fatalf("a second enclave serves %v, the first %v", ids, before)
	}

	// Rotation through the proxy: a new RSA version, the old one still
	// listed; the previous sealed keyset is kept beside the new one.
	rsaOld, err := c.Signer.GetPublicKey(callCtx(t), &pb.GetPublicKeyRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_RSA}}})
	if err != nil {
		t.Fatal(err)
	}
	out, err := cli(t, "", "keys", "create", "--target", e2.target, "--type", "rsa")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("nitrosign keys create: %s", strings.TrimSpace(out))
	if prev, err := os.ReadFile(s.keyset + ".prev"); err != nil || !bytes.Equal(prev, stored) {
		t.Fatalf("the previous sealed keyset is not kept beside the new one: %v", err)
	}
	if _, err := cli(t, "", "keys", "disable", "--target", e2.target, rsaOld.GetKey().GetKeyId()); err != nil {
		t.Fatal(err)
	}
	list, err := dial(t, e2.target, 1).Signer.ListKeys(callCtx(t), &pb.ListKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(list.GetKeys()); n != 4 {
		t.Fatalf("%d keys after a rotation, want 4", n)
	}
	// The second enclave takes the rotated keyset at its next refresh.
	deadline := time.Now().Add(60 * time.Second * scale)
	for len(sealedKeyIDs(t, second.target)) != 4 {
		if time.Now().After(deadline) {
			t.Fatal("the second enclave did not take the rotated keyset")
		}
		time.Sleep(time.Second)
	}

	// An enclave the key policy does not admit gets no data key.
	s.kms.KMS.SetPCRs(map[uint][]byte{0: bytes.Repeat([]byte{7}, 48)})
	refusedPort := vsockPort()
	refused := start(t, "nitrosign-enclave", append([]string{"--cid", "1", "--port", fmt.Sprint(refusedPort), "--dev-simulated-nsm"}, s.enclArgs...)...)
	reason = notServingReason(t, fmt.Sprintf("vsock://1:%d", refusedPort), refused, "AccessDeniedException")
	t.Logf("an enclave the key policy does not admit: %s", reason)
}
