package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/nitrosign/nitrosign/fakes/devroot"
	"github.com/nitrosign/nitrosign/host/client"
	"github.com/nitrosign/nitrosign/internal/callauth"
	"github.com/nitrosign/nitrosign/internal/target"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// authzEnv is a proxy that stores the audit trail, and an enclave with a
// policy: alice may sign with the ECC key (ECDSA_SHA_256), ops may
// administer keys; no anonymous calls.
type authzEnv struct {
	dir, auditFile, rootFile, policy string
	alice, mallory, ops              string // identity files
	proxy                            *proxy
	encArgs                          []string
	target                           string
}

func newAuthzEnv(t *testing.T) *authzEnv {
	t.Helper()
	dir := t.TempDir()
	e := &authzEnv{dir: dir, auditFile: filepath.Join(dir, "audit.jsonl"), rootFile: filepath.Join(dir, "dev-root.pem"),
		policy: filepath.Join(dir, "policy.json")}
	root, err := devroot.New()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(e.rootFile, root, 0o600); err != nil {
		t.Fatal(err)
	}
	ids := map[string]*callauth.Identity{}
	for _, name := range []string{"alice", "mallory", "ops"} {
		path := filepath.Join(dir, name+".key")
		if out, err := cli(t, "", "identity", "create", "--out", path); err != nil {
			t.Fatal(err)
		} else if name == "alice" {
			t.Logf("nitrosign identity create --out alice.key: %s", strings.TrimSpace(out))
		}
		id, err := callauth.LoadIdentity(path)
		if err != nil {
			t.Fatal(err)
		}
		ids[name] = id
	}
	e.alice, e.mallory, e.ops = filepath.Join(dir, "alice.key"), filepath.Join(dir, "mallory.key"), filepath.Join(dir, "ops.key")
	pol, err := json.Marshal(map[string]any{"version": 1, "callers": []any{
		map[string]any{"name": "alice", "public_key": string(ids["alice"].PublicKeyPEM()),
			"sign": []any{map[string]any{"key_types": []string{"ECC"}, "algorithms": []string{"ECDSA_SHA_256"}}}},
		map[string]any{"name": "ops", "public_key": string(ids["ops"].PublicKeyPEM()), "admin": true},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(e.policy, pol, 0o600); err != nil {
		t.Fatal(err)
	}
	ports := vsockPorts(2)
	port, auditPort := ports[0], ports[1]
	e.target = fmt.Sprintf("vsock://1:%d", port)
	addr := tcpAddr(t)
	e.proxy = &proxy{proc: start(t, "nitrosign-proxy", "--listen", addr, "--upstream", e.target, "--pool-size", "2",
		"--enclave-audit-port", fmt.Sprint(auditPort), "--audit-file", e.auditFile), addr: addr, target: "tcp://" + addr}
	e.encArgs = []string{"--cid", "1", "--port", fmt.Sprint(port), "--dev-simulated-nsm", "--dev-simulated-nsm-root", e.rootFile,
		"--policy", e.policy, "--audit-ship", fmt.Sprintf("vsock://1:%d", auditPort)}
	return e
}

func (e *authzEnv) startEnclave(t *testing.T) *enclave {
	t.Helper()
	en := &enclave{proc: start(t, "nitrosign-enclave", e.encArgs...), target: e.target}
	waitServing(t, e.target, en.proc)
	waitServing(t, e.proxy.target, e.proxy.proc)
	return en
}

// cliCode runs the CLI and returns the gRPC code it reported ("OK" on
// success).
func cliCode(t *testing.T, args ...string) string {
	t.Helper()
	_, err := cli(t, "", args...)
	if err == nil {
		return "OK"
	}
	for _, c := range []codes.Code{codes.Unauthenticated, codes.PermissionDenied, codes.Unavailable, codes.InvalidArgument} {
		if strings.Contains(err.Error(), c.String()+":") {
			return c.String()
		}
	}
	return err.Error()
}

// Allowed and refused callers, through the proxy and directly over vsock;
// the proxy (or anything on the parent) cannot sign on its own; forged,
// tampered, replayed and expired calls are refused; every decision is in
// the audit trail, which nitrosign audit verify accepts across a restart
// and rejects once a line is edited.
func TestCallersAndAuditTrail(t *testing.T) {
	e := newAuthzEnv(t)
	en := e.startEnclave(t)
	for _, tg := range []string{e.proxy.target, e.target} {
		sign := func(id string, keyType string) string {
			args := []string{"sign", "--target", tg, "--key-type", keyType, "--message", "pay 100 to alice"}
			if id != "" {
				args = append(args, "--identity", id)
			}
			return cliCode(t, args...)
		}
		results := map[string]string{
			"alice, ECC":                  sign(e.alice, "ecc"),
			"alice, RSA":                  sign(e.alice, "rsa"),
			"mallory (not in the policy)": sign(e.mallory, "ecc"),
			"no identity":                 sign("", "ecc"),
			"ops (admin only)":            sign(e.ops, "ecc"),
		}
		want := map[string]string{"alice, ECC": "OK", "alice, RSA": "PermissionDenied", "mallory (not in the policy)": "Unauthenticated",
			"no identity": "Unauthenticated", "ops (admin only)": "PermissionDenied"}
		for k, w := range want {
			if results[k] != w {
				t.Errorf("%s via %s: %s, want %s", k, tg, results[k], w)
			}
		}
		t.Logf("via %s: %v", tg, results)
	}

	// Raw calls over vsock, as anything on the parent could send them.
	t0, err := target.Parse(e.target)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := grpc.NewClient(t0.GRPCTarget(), grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithContextDialer(t0.Dialer()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	alice, err := callauth.LoadIdentity(e.alice)
	if err != nil {
		t.Fatal(err)
	}
	req := &pb.SignRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_ECC}}, Message: []byte("pay 100 to alice")}
	body, _ := proto.MarshalOptions{Deterministic: true}.Marshal(req)
	call := func(md metadata.MD, r *pb.SignRequest) codes.Code {
		var resp pb.SignResponse
		err := cc.Invoke(metadata.NewOutgoingContext(callCtx(t), md), pb.SignerService_Sign_FullMethodName, r, &resp)
		return status.Code(err)
	}
	signed := func(at time.Time) metadata.MD {
		md, err := callauth.Sign(alice, pb.SignerService_Sign_FullMethodName, body, at)
		if err != nil {
			t.Fatal(err)
		}
		return md
	}
	md := signed(time.Now())
	// Alice's name, a signature by another key.
	wrongKey := signed(time.Now())
	other0, err := callauth.NewIdentity(callauth.TypeEd25519)
	if err != nil {
		t.Fatal(err)
	}
	imp, err := callauth.Sign(other0, pb.SignerService_Sign_FullMethodName, body, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	wrongKey.Set(callauth.MDSignature, imp.Get(callauth.MDSignature)[0])
	tampered := proto.Clone(req).(*pb.SignRequest)
	tampered.Message = []byte("pay 900 to mallory")
	raw := map[string]codes.Code{
		"signed":           call(md, req),
		"replayed":         call(md, req),
		"tampered message": call(signed(time.Now()), tampered),
		"expired":          call(signed(time.Now().Add(-time.Hour)), req),
		"no metadata":      call(metadata.MD{}, req),
		"wrong key":        call(wrongKey, req),
	}
	t.Logf("raw calls over vsock: %v", raw)
	for k, want := range map[string]codes.Code{"signed": codes.OK, "replayed": codes.Unauthenticated, "tampered message": codes.Unauthenticated,
		"expired": codes.Unauthenticated, "no metadata": codes.Unauthenticated, "wrong key": codes.Unauthenticated} {
		if raw[k] != want {
			t.Errorf("raw %s call: %s, want %s", k, raw[k], want)
		}
	}
	// Sessions (the Go client's default), through the proxy and directly:
	// one OpenSession signed, then calls by MAC; the policy applies; a
	// MAC over another body, a replayed session call and a session call
	// renamed to another caller are refused.
	sessions := map[string]*client.Client{}
	for _, tg := range []string{e.proxy.target, e.target} {
		sc, err := client.Dial(callCtx(t), tg, client.Options{Identity: alice})
		if err != nil {
			t.Fatal(err)
		}
		defer sc.Close()
		sessions[tg] = sc
		for i := 0; i < 5; i++ {
			if _, err := sc.Signer.Sign(callCtx(t), req); err != nil {
				t.Fatalf("alice in a session via %s, call %d: %v", tg, i, err)
			}
		}
		rsa := &pb.SignRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_RSA}}, Message: []byte("x")}
		if _, err := sc.Signer.Sign(callCtx(t), rsa); status.Code(err) != codes.PermissionDenied {
			t.Errorf("alice with the RSA key in a session via %s: %v, want PermissionDenied", tg, err)
		}
	}
	s, err := callauth.OpenSession(callCtx(t), cc, alice)
	if err != nil {
		t.Fatal(err)
	}
	smd, err := s.Authenticate(pb.SignerService_Sign_FullMethodName, body, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	renamed := smd.Copy()
	mallory, err := callauth.LoadIdentity(e.mallory)
	if err != nil {
		t.Fatal(err)
	}
	renamed.Set(callauth.MDCaller, mallory.KeyID())
	other, err := s.Authenticate(pb.SignerService_Sign_FullMethodName, body, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	ses := map[string]codes.Code{
		"session":               call(smd, req),
		"replayed":              call(smd, req),
		"MAC over another body": call(other, tampered),
		"renamed":               call(renamed, req),
	}
	t.Logf("raw session calls over vsock: %v", ses)
	for k, want := range map[string]codes.Code{"session": codes.OK, "replayed": codes.Unauthenticated, "MAC over another body": codes.Unauthenticated,
		"renamed": codes.Unauthenticated} {
		if ses[k] != want {
			t.Errorf("raw %s call: %s, want %s", k, ses[k], want)
		}
	}

	// Key administration: ops may (directly over vsock; the proxy refuses
	// it to its clients by default), alice may not.
	if got := cliCode(t, "keys", "create", "--target", e.target, "--type", "ecc", "--identity", e.alice); got != "PermissionDenied" {
		t.Errorf("alice creating a key: %s", got)
	}
	if got := cliCode(t, "keys", "create", "--target", e.target, "--type", "ecc", "--identity", e.ops); !strings.Contains(got, "FailedPrecondition") {
		t.Errorf("ops creating a key on ephemeral keys: %s, want FailedPrecondition from the keys (authorised)", got)
	}

	// A restart: a new chain naming the last head of the first.
	en.signal(syscall.SIGTERM)
	if code := en.wait(t, 30*time.Second*scale); code != 0 {
		t.Fatalf("enclave exit status %d", code)
	}
	e.startEnclave(t)
	if got := cliCode(t, "sign", "--target", e.proxy.target, "--key-type", "ecc", "--message", "after the restart", "--identity", e.alice); got != "OK" {
		t.Fatalf("alice after the restart: %s", got)
	}
	// The sessions opened before the restart are not accepted by the new
	// enclave (new ephemeral keys): the clients open new ones by
	// themselves, and the call goes through.
	for tg, sc := range sessions {
		if _, err := sc.Signer.Sign(callCtx(t), req); err != nil {
			t.Fatalf("alice's session client via %s after the restart: %v", tg, err)
		}
	}
	time.Sleep(2 * time.Second) // the head of the last decision (1 s) reaches the file
	out, err := cli(t, "", "audit", "verify", "--file", e.auditFile, "--dev-trust-root", e.rootFile)
	if err != nil {
		t.Fatalf("the audit trail does not verify: %v\n%s", err, out)
	}
	t.Logf("nitrosign audit verify:\n%s", out)
	lines, err := os.ReadFile(e.auditFile)
	if err != nil {
		t.Fatal(err)
	}
	denied, allowed := strings.Count(string(lines), `"outcome":"denied"`), strings.Count(string(lines), `"outcome":"allowed"`)
	if denied < 11 || allowed < 4 || strings.Count(string(lines), `"kind":"genesis"`) != 2 {
		t.Fatalf("audit trail: %d allowed, %d denied decisions, %d chains; want every decision above in two chains", allowed, denied, strings.Count(string(lines), `"kind":"genesis"`))
	}
	if strings.Contains(string(lines), "pay 100 to alice") {
		t.Fatal("the audit trail holds a message")
	}
	// Edit one decision, keeping it well formed (an allowed call made to
	// look refused): verify must find it by its hash.
	edited := strings.Replace(string(lines), `"outcome":"allowed","code":"OK"`, `"outcome":"denied","code":"PermissionDenied"`, 1)
	if edited == string(lines) {
		t.Fatal("no allowed decision to edit")
	}
	bad := filepath.Join(e.dir, "changed.jsonl")
	if err := os.WriteFile(bad, []byte(edited), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err = cli(t, "", "audit", "verify", "--file", bad, "--dev-trust-root", e.rootFile)
	if err == nil || !strings.Contains(out, ": error: edited (chain ") {
		t.Fatalf("an edited audit trail verified, or the edit was not reported as one: %v\n%s", err, out)
	}
	t.Logf("nitrosign audit verify of a file with one line edited:\n%s\n%v", out, err)
}
