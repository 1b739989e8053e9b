package authz_test

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/nitrosign/nitrosign/enclave/enclavetest"
	"github.com/nitrosign/nitrosign/host/verify"
	"github.com/nitrosign/nitrosign/internal/callauth"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func identity(t *testing.T, kind string) *callauth.Identity {
	t.Helper()
	id, err := callauth.NewIdentity(kind)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// dial connects as id (nil: anonymous).
func dial(t testing.TB, addr string, id *callauth.Identity) *grpc.ClientConn {
	t.Helper()
	opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if id != nil {
		opts = append(opts, grpc.WithUnaryInterceptor(callauth.UnaryClientInterceptor(id, nil)))
	}
	cc, err := grpc.NewClient("passthrough:///"+addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func signReq(kt pb.KeyType, alg pb.SigningAlgorithm) *pb.SignRequest {
	return &pb.SignRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: kt}}, Message: []byte("pay 100 to alice"), SigningAlgorithm: alg}
}

// setup runs an enclave with a policy: "payments" (Ed25519) may sign with
// the ECC key using ECDSA_SHA_256 only; "ops" (P-256) may administer keys
// and sign nothing. Anonymous calls are refused.
func setup(t *testing.T) (addr string, payments, ops *callauth.Identity, policy []byte) {
	t.Helper()
	payments, ops = identity(t, "ed25519"), identity(t, "p256")
	pol := map[string]any{"version": 1, "callers": []any{
		map[string]any{"name": "payments", "public_key": string(payments.PublicKeyPEM()),
			"sign": []any{map[string]any{"key_types": []string{"ECC"}, "algorithms": []string{"ECDSA_SHA_256"}}}},
		map[string]any{"name": "ops", "public_key": string(ops.PublicKeyPEM()), "admin": true},
	}}
	raw, err := json.Marshal(pol)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "policy.json")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	c := enclavetest.DefaultConfig()
	c.Authz.DevAllowAnonymous = false
	c.Authz.PolicyFile = path
	e := enclavetest.Start(t, c, 0)
	return e.Addr, payments, ops, raw
}

func wantCode(t *testing.T, what string, err error, code codes.Code, text string) {
	t.Helper()
	if status.Code(err) != code || !strings.Contains(status.Convert(err).Message(), text) {
		t.Fatalf("%s: %v; want %s with %q", what, err, code, text)
	}
}

func TestCallersAuthenticatedAndAuthorised(t *testing.T) {
	addr, payments, ops, _ := setup(t)
	ecdsa256 := pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256

	// Allowed: payments signs with the ECC key.
	pc := pb.NewSignerServiceClient(dial(t, addr, payments))
	if _, err := pc.Sign(ctx(t), signReq(pb.KeyType_KEY_TYPE_ECC, ecdsa256)); err != nil {
		t.Fatalf("an allowed call: %v", err)
	}
	if _, err := pc.Sign(ctx(t), signReq(pb.KeyType_KEY_TYPE_ECC, 0)); err != nil {
		t.Fatalf("an allowed call with the key's default algorithm: %v", err)
	}
	// Not allowed for that key or algorithm.
	_, err := pc.Sign(ctx(t), signReq(pb.KeyType_KEY_TYPE_RSA, 0))
	wantCode(t, "payments with the RSA key", err, codes.PermissionDenied, `caller "payments" may not sign with key`)
	// Administration: ops may, payments may not; ops may not sign.
	_, err = pb.NewKeyAdminServiceClient(dial(t, addr, payments)).CreateKey(ctx(t), &pb.CreateKeyRequest{KeyType: pb.KeyType_KEY_TYPE_ECC})
	wantCode(t, "payments administering keys", err, codes.PermissionDenied, "may not administer keys")
	_, err = pb.NewKeyAdminServiceClient(dial(t, addr, ops)).CreateKey(ctx(t), &pb.CreateKeyRequest{KeyType: pb.KeyType_KEY_TYPE_ECC})
	wantCode(t, "ops administering ephemeral keys (authorised, then refused by the keys)", err, codes.FailedPrecondition, "ephemeral")
	_, err = pb.NewSignerServiceClient(dial(t, addr, ops)).Sign(ctx(t), signReq(pb.KeyType_KEY_TYPE_ECC, ecdsa256))
	wantCode(t, "ops signing", err, codes.PermissionDenied, `caller "ops" may not sign`)

	// Unknown caller, missing metadata.
	_, err = pb.NewSignerServiceClient(dial(t, addr, identity(t, "ed25519"))).Sign(ctx(t), signReq(pb.KeyType_KEY_TYPE_ECC, ecdsa256))
	wantCode(t, "an unknown caller", err, codes.Unauthenticated, "unknown caller")
	anon := dial(t, addr, nil)
	_, err = pb.NewSignerServiceClient(anon).Sign(ctx(t), signReq(pb.KeyType_KEY_TYPE_ECC, ecdsa256))
	wantCode(t, "no caller signature", err, codes.Unauthenticated, "carries no caller signature")

	// Open methods need no identity.
	if _, err := pb.NewEchoServiceClient(anon).Echo(ctx(t), &pb.EchoRequest{Payload: []byte("x")}); err != nil {
		t.Fatalf("Echo: %v", err)
	}
	if _, err := pb.NewSignerServiceClient(anon).ListKeys(ctx(t), &pb.ListKeysRequest{}); err != nil {
		t.Fatalf("ListKeys: %v", err)
	}
	if r, err := healthpb.NewHealthClient(anon).Check(ctx(t), &healthpb.HealthCheckRequest{}); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v %v", r, err)
	}
}

// rawCall sends req to method with md, bypassing the client interceptor,
// so a test can tamper with what a signed call carries.
func rawCall(t *testing.T, cc *grpc.ClientConn, method string, md metadata.MD, req proto.Message) error {
	t.Helper()
	var resp pb.SignResponse
	return cc.Invoke(metadata.NewOutgoingContext(ctx(t), md), method, req, &resp)
}

// Forged, tampered, replayed and stale calls are refused; the enclave
// keeps serving.
func TestTamperedAndReplayedCallsRefused(t *testing.T) {
	addr, payments, _, _ := setup(t)
	cc := dial(t, addr, nil)
	method := pb.SignerService_Sign_FullMethodName
	req := signReq(pb.KeyType_KEY_TYPE_ECC, pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256)
	body, err := proto.MarshalOptions{Deterministic: true}.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	sign := func(msg []byte, at time.Time) metadata.MD {
		md, err := callauth.Sign(payments, method, msg, at)
		if err != nil {
			t.Fatal(err)
		}
		return md
	}
	md := sign(body, time.Now())
	if err := rawCall(t, cc, method, md, req); err != nil {
		t.Fatalf("a correctly signed raw call: %v", err)
	}
	wantCode(t, "the same call again", rawCall(t, cc, method, md, req), codes.Unauthenticated, "replayed")

	other := proto.Clone(req).(*pb.SignRequest)
	other.Message = []byte("pay 900 to alice")
	wantCode(t, "a signature over another body", rawCall(t, cc, method, sign(body, time.Now()), other), codes.Unauthenticated, "bad caller signature")
	wantCode(t, "an expired timestamp", rawCall(t, cc, method, sign(body, time.Now().Add(-10*time.Minute)), req), codes.Unauthenticated, "outside the window")

	forged := sign(body, time.Now())
	forged.Set("nitrosign-caller", identity(t, "ed25519").KeyID())
	wantCode(t, "another caller's id", rawCall(t, cc, method, forged, req), codes.Unauthenticated, "unknown caller")
	wrongKey := sign(body, time.Now())
	imp, err := callauth.Sign(identity(t, "ed25519"), method, body, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	wrongKey.Set("nitrosign-signature-bin", imp.Get("nitrosign-signature-bin")[0])
	wantCode(t, "a signature by another key", rawCall(t, cc, method, wrongKey, req), codes.Unauthenticated, "bad caller signature")
	partial := sign(body, time.Now())
	partial.Delete("nitrosign-nonce")
	wantCode(t, "a missing nonce", rawCall(t, cc, method, partial, req), codes.Unauthenticated, "nitrosign-nonce")

	if _, err := pb.NewSignerServiceClient(dial(t, addr, payments)).Sign(ctx(t), req); err != nil {
		t.Fatalf("the enclave stopped serving after the refusals: %v", err)
	}
}

// The attestation document commits to the policy in force.
func TestAttestationCommitsToPolicy(t *testing.T) {
	addr, _, _, raw := setup(t)
	r, err := pb.NewAttestationServiceClient(dial(t, addr, nil)).Attest(ctx(t), &pb.AttestRequest{Nonce: []byte("n")})
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(r.GetPolicy()) != sha256.Sum256(raw) {
		t.Fatal("the attestation response does not carry the policy in force")
	}
	root, err := x509.ParseCertificate(r.GetSimulatedRootCertificate())
	if err != nil {
		t.Fatal(err)
	}
	opts := verify.Options{Root: root, Nonce: []byte("n"), Keys: r.GetKeys(), RequireKeyCommitment: true, Policy: r.GetPolicy()}
	if _, err := verify.Verify(r.GetDocument(), opts); err != nil {
		t.Fatalf("the document does not verify with its policy: %v", err)
	}
	opts.Policy = []byte(`{"version":1,"callers":[]}`)
	if _, err := verify.Verify(r.GetDocument(), opts); err == nil {
		t.Fatal("the document verified with another policy")
	}
	opts.Policy = nil
	if _, err := verify.Verify(r.GetDocument(), opts); err == nil {
		t.Fatal("the document verified without its policy")
	}
}

// Development: anonymous calls sign when allowed; signed calls are still
// checked.
func TestDevAllowAnonymous(t *testing.T) {
	e := enclavetest.Start(t, enclavetest.DefaultConfig(), 0)
	if _, err := pb.NewSignerServiceClient(dial(t, e.Addr, nil)).Sign(ctx(t), signReq(pb.KeyType_KEY_TYPE_ED25519, 0)); err != nil {
		t.Fatalf("anonymous with --dev-allow-anonymous: %v", err)
	}
	_, err := pb.NewSignerServiceClient(dial(t, e.Addr, identity(t, "p256"))).Sign(ctx(t), signReq(pb.KeyType_KEY_TYPE_ED25519, 0))
	wantCode(t, "a signed call to an enclave without a policy", err, codes.Unauthenticated, "no caller policy")
}
