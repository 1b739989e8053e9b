package keyset_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nitrosign/nitrosign/enclave"
	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/enclave/enclavetest"
	"github.com/nitrosign/nitrosign/enclave/server"
	"github.com/nitrosign/nitrosign/enclave/signer"
	"github.com/nitrosign/nitrosign/fakes/devroot"
	"github.com/nitrosign/nitrosign/fakes/kmsfake"
	"github.com/nitrosign/nitrosign/internal/keysetfmt"
	"github.com/nitrosign/nitrosign/internal/sigalg"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// memHost is the host's HostService in memory: what nitrosign-proxy
// serves from its file (host/keystore), with the same contract.
type memHost struct {
	pb.UnimplementedHostServiceServer
	mu      sync.Mutex
	sealed  []byte
	prev    []byte
	init    bool
	puts    int
	creds   int
	credTTL time.Duration // how long the credentials handed out last (default 1h)
	unreach bool
}

func (h *memHost) GetSealedKeyset(context.Context, *pb.GetSealedKeysetRequest) (*pb.GetSealedKeysetResponse, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.unreach {
		return nil, status.Error(codes.Unavailable, "host store down")
	}
	return &pb.GetSealedKeysetResponse{Sealed: bytes.Clone(h.sealed), InitRequested: h.sealed == nil && h.init, Location: "mem:keyset.sealed"}, nil
}

func (h *memHost) PutSealedKeyset(_ context.Context, r *pb.PutSealedKeysetRequest) (*pb.PutSealedKeysetResponse, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, err := keysetfmt.Parse(r.GetSealed()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	var cur []byte
	if h.sealed != nil {
		sum := sha256.Sum256(h.sealed)
		cur = sum[:]
	}
	if !bytes.Equal(cur, r.GetReplacesSha256()) {
		return nil, status.Error(codes.Aborted, "the keyset changed")
	}
	h.prev, h.sealed, h.init = h.sealed, bytes.Clone(r.GetSealed()), false
	h.puts++
	return &pb.PutSealedKeysetResponse{Location: "mem:keyset.sealed", PreviousLocation: "mem:keyset.sealed.prev"}, nil
}

func (h *memHost) GetCredentials(context.Context, *pb.GetCredentialsRequest) (*pb.GetCredentialsResponse, error) {
	h.mu.Lock()
	h.creds++
	ttl := h.credTTL
	h.mu.Unlock()
	if ttl == 0 {
		ttl = time.Hour
	}
	c := kmsfake.Credentials()
	return &pb.GetCredentialsResponse{AccessKeyId: c.AccessKeyID, SecretAccessKey: c.SecretAccessKey, SessionToken: c.SessionToken,
		Expiration: timestamppb.New(time.Now().Add(ttl))}, nil
}

func (h *memHost) get() []byte {
	h.mu.Lock()
	defer h.mu.Unlock()
	return bytes.Clone(h.sealed)
}

func (h *memHost) set(b []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.sealed = b
}

// env is a test KMS over TLS, a host, and what an enclave needs to reach
// both.
type env struct {
	kms    *kmsfake.Server
	host   *memHost
	hostAt string
	caFile string
	// rootFile is the simulated NSMs' development root (cert and key).
	rootFile string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	// One development root for every simulated enclave, which the test
	// KMS trusts as AWS KMS trusts the Nitro root.
	rootPEM, err := devroot.New()
	if err != nil {
		t.Fatal(err)
	}
	rootFile := filepath.Join(t.TempDir(), "dev-root.pem")
	if err := os.WriteFile(rootFile, rootPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	sim, err := attest.NewSimulatedFromRoot(nil, rootPEM)
	if err != nil {
		t.Fatal(err)
	}
	root, err := x509.ParseCertificate(sim.DevRootDER())
	if err != nil {
		t.Fatal(err)
	}
	srv, err := kmsfake.Start(kmsfake.New(root, map[uint][]byte{0: attest.SimulatedPCRs()[0]}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	caFile := filepath.Join(t.TempDir(), "kms-ca.pem")
	if err := os.WriteFile(caFile, srv.CAPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	h := &memHost{}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	pb.RegisterHostServiceServer(gs, h)
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)
	return &env{kms: srv, host: h, hostAt: "tcp://" + lis.Addr().String(), caFile: caFile, rootFile: rootFile}
}

func (e *env) config() enclave.Config {
	c := enclavetest.DefaultConfig()
	c.Signer.KeyMode = signer.Sealed
	c.Attest.DevRootFile = e.rootFile
	c.Keyset.KMSKeyARN = kmsfake.KeyARN
	c.Keyset.HostAddr = e.hostAt
	c.Keyset.KMSProxy = "tcp://" + e.kms.Addr
	c.Keyset.KMSCAFile = e.caFile
	c.Keyset.RetryMin, c.Keyset.RetryMax = 20*time.Millisecond, 200*time.Millisecond
	c.Keyset.RefreshInterval = 100 * time.Millisecond
	c.Keyset.AttemptTimeout = 5 * time.Second
	return c
}

type client struct {
	conn   *grpc.ClientConn
	signer pb.SignerServiceClient
	admin  pb.KeyAdminServiceClient
	hc     healthpb.HealthClient
}

func dial(t *testing.T, e *enclavetest.Enclave) *client {
	t.Helper()
	conn, err := grpc.NewClient("passthrough:///"+e.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return &client{conn, pb.NewSignerServiceClient(conn), pb.NewKeyAdminServiceClient(conn), healthpb.NewHealthClient(conn)}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

// health returns the enclave's status and the reason it gives for not
// serving.
func (c *client) health(t *testing.T) (healthpb.HealthCheckResponse_ServingStatus, string) {
	t.Helper()
	var tr metadata.MD
	r, err := c.hc.Check(ctx(t), &healthpb.HealthCheckRequest{}, grpc.Trailer(&tr))
	if err != nil {
		t.Fatal(err)
	}
	reason := ""
	if v := tr.Get(server.NotReadyTrailer); len(v) > 0 {
		reason = v[0]
	}
	return r.GetStatus(), reason
}

// waitServing waits for SERVING; it fails with the last reason given.
func (c *client) waitServing(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		st, reason := c.health(t)
		if st == healthpb.HealthCheckResponse_SERVING {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not SERVING after 15s: %s", reason)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitReason waits for NOT_SERVING with a reason that contains want.
func (c *client) waitReason(t *testing.T, want string) string {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		st, reason := c.health(t)
		if st == healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("SERVING, want NOT_SERVING because of %q", want)
		}
		if strings.Contains(reason, want) {
			return reason
		}
		if time.Now().After(deadline) {
			t.Fatalf("reason %q after 15s, want one with %q", reason, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (c *client) ids(t *testing.T) []string {
	t.Helper()
	r, err := c.signer.ListKeys(ctx(t), &pb.ListKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, k := range r.GetKeys() {
		out = append(out, k.GetKeyId())
	}
	return out
}

func (c *client) sign(t *testing.T, sel *pb.KeySelector, msg string) (*pb.SignResponse, error) {
	t.Helper()
	return c.signer.Sign(ctx(t), &pb.SignRequest{Key: sel, Message: []byte(msg)})
}

func byType(t pb.KeyType) *pb.KeySelector {
	return &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: t}}
}
func byID(id string) *pb.KeySelector {
	return &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: id}}
}

// verify checks sig with the public key the enclave behind c lists for
// its key id.
func (c *client) verify(t *testing.T, resp *pb.SignResponse, msg string) {
	t.Helper()
	k, err := c.signer.GetPublicKey(ctx(t), &pb.GetPublicKeyRequest{Key: byID(resp.GetKeyId())})
	if err != nil {
		t.Fatal(err)
	}
	pub, err := x509.ParsePKIXPublicKey(k.GetKey().GetPublicKey())
	if err != nil {
		t.Fatal(err)
	}
	if err := sigalg.Verify(pub, resp.GetSigningAlgorithm(), pb.MessageType_MESSAGE_TYPE_RAW, []byte(msg), resp.GetSignature()); err != nil {
		t.Fatalf("signature by %s does not verify: %v", resp.GetKeyId(), err)
	}
}

// A restarted enclave unseals the keyset the first one made: the same key
// ids, and a signature made before the restart verifies with the keys
// served after it. A second enclave serves the same keyset.
func TestRestartKeepsKeys(t *testing.T) {
	e := newEnv(t)
	e.host.init = true
	first := enclavetest.Start(t, e.config(), 0)
	c := dial(t, first)
	c.waitServing(t)
	ids := c.ids(t)
	if len(ids) != 3 {
		t.Fatalf("%d keys, want RSA, ECC and Ed25519", len(ids))
	}
	sig, err := c.sign(t, byType(pb.KeyType_KEY_TYPE_ECC), "before the restart")
	if err != nil {
		t.Fatal(err)
	}
	if err := first.Stop(); err != nil {
		t.Fatal(err)
	}
	stored := e.host.get()

	second := enclavetest.Start(t, e.config(), 0)
	c2 := dial(t, second)
	c2.waitServing(t)
	if got := c2.ids(t); strings.Join(got, ",") != strings.Join(ids, ",") {
		t.Fatalf("after a restart the key ids are %v, were %v", got, ids)
	}
	c2.verify(t, sig, "before the restart")
	third := enclavetest.Start(t, e.config(), 0)
	c3 := dial(t, third)
	c3.waitServing(t)
	if got := c3.ids(t); strings.Join(got, ",") != strings.Join(ids, ",") {
		t.Fatalf("a second enclave serves %v, the first %v", got, ids)
	}
	if !bytes.Equal(e.host.get(), stored) || e.host.puts != 1 {
		t.Fatalf("the host's keyset was rewritten by an unseal (%d puts)", e.host.puts)
	}
	if calls := e.kms.KMS.Called(); calls != "[GenerateDataKey Decrypt Decrypt]" {
		t.Fatalf("KMS calls %s, want one GenerateDataKey (init) and a Decrypt per later start", calls)
	}
}

// Without a keyset and without the operator's init, no keys are made: the
// enclave says why and waits; once the operator asks, it creates them
// without a restart.
func TestNoKeysetWithoutInit(t *testing.T) {
	e := newEnv(t)
	c := dial(t, enclavetest.Start(t, e.config(), 0))
	c.waitReason(t, "nitrosign keyset init")
	if _, err := c.sign(t, byType(pb.KeyType_KEY_TYPE_RSA), "m"); status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "no sealed keyset") {
		t.Fatalf("Sign before the keyset: %v, want Unavailable saying why", err)
	}
	if _, err := c.signer.ListKeys(ctx(t), &pb.ListKeysRequest{}); status.Code(err) != codes.Unavailable {
		t.Fatalf("ListKeys before the keyset: %v, want Unavailable", err)
	}
	if e.host.get() != nil || len(e.kms.KMS.Calls()) != 0 {
		t.Fatal("a keyset was made, or KMS called, without init")
	}
	e.host.mu.Lock()
	e.host.init = true
	e.host.mu.Unlock()
	c.waitServing(t)
	if len(c.ids(t)) != 3 || e.host.get() == nil {
		t.Fatal("init did not create and store a keyset")
	}
}

// A keyset that exists but cannot be opened is never replaced: the
// enclave does not serve, says why, and leaves the host's file alone.
func TestUnopenableKeysetRefused(t *testing.T) {
	e := newEnv(t)
	e.host.init = true
	c := dial(t, enclavetest.Start(t, e.config(), 0))
	c.waitServing(t)
	good := e.host.get()
	p, err := keysetfmt.Parse(good)
	if err != nil {
		t.Fatal(err)
	}
	withHeader := func(old, new string) []byte {
		h := *p.Header
		h.KMSKeyARN = strings.Replace(h.KMSKeyARN, old, new, 1)
		if old == "created" {
			h.Created = h.Created.Add(-time.Hour)
		}
		frame, err := keysetfmt.Frame(h, p.Blob)
		if err != nil {
			t.Fatal(err)
		}
		return append(append(frame, p.Nonce...), p.Ciphertext...)
	}
	otherKMSKey := strings.Replace(kmsfake.KeyARN, "0b5c5a3e", "99999999", 1)
	cases := []struct {
		name   string
		sealed []byte
		want   string
	}{
		{"corrupt body", append(bytes.Clone(good[:len(good)-1]), good[len(good)-1]^1), "does not open"},
		{"truncated body", good[:len(good)-20], "does not open"},
		{"truncated header", good[:20], "header of"},
		{"garbage", []byte("not a keyset at all, just bytes"), "magic"},
		{"swapped header", withHeader("created", "created"), "does not open"},
		{"another KMS key", withHeader(kmsfake.KeyARN, otherKMSKey), "another KMS key"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e.host.set(tc.sealed)
			puts := e.host.puts
			c := dial(t, enclavetest.Start(t, e.config(), 0))
			reason := c.waitReason(t, tc.want)
			if !strings.Contains(reason, "cannot be unsealed") && !strings.Contains(reason, "corrupt") {
				t.Fatalf("reason %q does not say the keyset cannot be unsealed", reason)
			}
			if !bytes.Equal(e.host.get(), tc.sealed) || e.host.puts != puts {
				t.Fatal("the host's keyset was overwritten")
			}
		})
	}
	// Restored, every enclave serves it again, with the old keys.
	e.host.set(good)
	c2 := dial(t, enclavetest.Start(t, e.config(), 0))
	c2.waitServing(t)
}

// An enclave whose measurements the key policy does not name gets no data
// key from KMS, and says so.
func TestPolicyRefusesOtherPCRs(t *testing.T) {
	e := newEnv(t)
	e.host.init = true
	c := dial(t, enclavetest.Start(t, e.config(), 0))
	c.waitServing(t)
	e.kms.KMS.SetPCRs(map[uint][]byte{0: bytes.Repeat([]byte{7}, 48)})
	stored := e.host.get()
	c2 := dial(t, enclavetest.Start(t, e.config(), 0))
	c2.waitReason(t, "AccessDeniedException")
	if !bytes.Equal(e.host.get(), stored) {
		t.Fatal("the host's keyset changed")
	}
}

// KMS down or slow: the enclave retries with backoff, says why, and
// serves once KMS answers again.
func TestKMSOutageRecovers(t *testing.T) {
	e := newEnv(t)
	e.host.init = true
	dial(t, enclavetest.Start(t, e.config(), 0)).waitServing(t)

	e.kms.KMS.SetDown(true)
	c := dial(t, enclavetest.Start(t, e.config(), 0))
	c.waitReason(t, "KMSInternalException")
	e.kms.KMS.SetDown(false)
	c.waitServing(t)

	cfg := e.config()
	cfg.Keyset.AttemptTimeout = 300 * time.Millisecond
	e.kms.KMS.SetDelay(2 * time.Second)
	c = dial(t, enclavetest.Start(t, cfg, 0))
	c.waitReason(t, "deadline exceeded")
	e.kms.KMS.SetDelay(0)
	c.waitServing(t)

	// The KMS endpoint (the parent's forwarder) unreachable.
	cfg = e.config()
	cfg.Keyset.KMSProxy = "tcp://127.0.0.1:1"
	c = dial(t, enclavetest.Start(t, cfg, 0))
	c.waitReason(t, "connection refused")
}

// Rotation: a new version becomes the type's default, the old one still
// signs by id until disabled, stays listed, and another enclave takes the
// rotated keyset; a concurrent change is refused, not lost.
func TestRotation(t *testing.T) {
	e := newEnv(t)
	e.host.init = true
	c := dial(t, enclavetest.Start(t, e.config(), 0))
	c.waitServing(t)
	other := dial(t, enclavetest.Start(t, e.config(), 0))
	other.waitServing(t)
	old, err := c.sign(t, byType(pb.KeyType_KEY_TYPE_RSA), "m")
	if err != nil {
		t.Fatal(err)
	}
	before := e.host.get()
	created, err := c.admin.CreateKey(ctx(t), &pb.CreateKeyRequest{KeyType: pb.KeyType_KEY_TYPE_RSA})
	if err != nil {
		t.Fatal(err)
	}
	k := created.GetKey()
	if k.GetVersion() != 2 || !k.GetTypeDefault() || k.GetKeyState() != pb.KeyState_KEY_STATE_ENABLED {
		t.Fatalf("new key %v, want version 2, the type's default, enabled", k)
	}
	e.host.mu.Lock()
	prev := e.host.prev
	e.host.mu.Unlock()
	if !bytes.Equal(prev, before) {
		t.Fatal("the previous sealed keyset was not kept beside the new one")
	}
	if s, err := c.sign(t, byType(pb.KeyType_KEY_TYPE_RSA), "m"); err != nil || s.GetKeyId() != k.GetKeyId() {
		t.Fatalf("Sign by type after CreateKey: %v, %v; want the new key", s.GetKeyId(), err)
	}
	if _, err := c.sign(t, byID(old.GetKeyId()), "m"); err != nil {
		t.Fatalf("the old key no longer signs by id: %v", err)
	}
	if _, err := c.admin.DisableKey(ctx(t), &pb.DisableKeyRequest{KeyId: old.GetKeyId()}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.sign(t, byID(old.GetKeyId()), "m"); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("Sign with a disabled key: %v, want FailedPrecondition", err)
	}
	list, err := c.signer.ListKeys(ctx(t), &pb.ListKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	states := map[string]pb.KeyState{}
	for _, k := range list.GetKeys() {
		states[k.GetKeyId()] = k.GetKeyState()
	}
	if len(states) != 4 || states[old.GetKeyId()] != pb.KeyState_KEY_STATE_DISABLED || states[k.GetKeyId()] != pb.KeyState_KEY_STATE_ENABLED {
		t.Fatalf("ListKeys after rotation: %v", states)
	}
	c.verify(t, old, "m") // its public key still verifies what it signed
	att, err := pb.NewAttestationServiceClient(c.conn).Attest(ctx(t), &pb.AttestRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, ak := range att.GetKeys() {
		if ak.GetKeyId() == old.GetKeyId() {
			t.Fatal("attestation commits to a disabled key")
		}
	}
	if len(att.GetKeys()) != 3 {
		t.Fatalf("attestation commits to %d keys, want the 3 enabled", len(att.GetKeys()))
	}

	// The other enclave takes the rotated keyset at its next refresh.
	deadline := time.Now().Add(10 * time.Second)
	for strings.Join(other.ids(t), ",") != strings.Join(c.ids(t), ",") {
		if time.Now().After(deadline) {
			t.Fatal("the second enclave did not take the rotated keyset")
		}
		time.Sleep(50 * time.Millisecond)
	}
	// A change from an enclave that has not seen the host's latest keyset
	// is refused, not lost: make the host's keyset newer behind c's back.
	e.host.mu.Lock()
	e.host.sealed = append(bytes.Clone(e.host.sealed[:len(e.host.sealed)-1]), e.host.sealed[len(e.host.sealed)-1]^1)
	e.host.mu.Unlock()
	if _, err := c.admin.CreateKey(ctx(t), &pb.CreateKeyRequest{KeyType: pb.KeyType_KEY_TYPE_ECC}); status.Code(err) != codes.Aborted {
		t.Fatalf("CreateKey over a changed keyset: %v, want Aborted", err)
	}
	if _, err := c.admin.CreateKey(ctx(t), &pb.CreateKeyRequest{KeyType: 9}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("CreateKey of an unknown type: %v, want InvalidArgument", err)
	}
	if _, err := c.admin.DisableKey(ctx(t), &pb.DisableKeyRequest{KeyId: strings.Repeat("a", 64)}); status.Code(err) != codes.NotFound {
		t.Fatalf("DisableKey of an unknown key: %v, want NotFound", err)
	}
}

// Ephemeral keys cannot be rotated: there is nothing stored.
func TestEphemeralHasNoAdmin(t *testing.T) {
	c := dial(t, enclavetest.Start(t, enclavetest.DefaultConfig(), 0))
	_, err := c.admin.CreateKey(ctx(t), &pb.CreateKeyRequest{KeyType: pb.KeyType_KEY_TYPE_RSA})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "--key-mode sealed") {
		t.Fatalf("CreateKey on ephemeral keys: %v", err)
	}
}

// The enclave asks the host for credentials once and keeps them while
// they last, and asks again before they expire (within 5 minutes of it).
func TestCredentialsRefreshedBeforeExpiry(t *testing.T) {
	fetches := func(ttl time.Duration) int {
		e := newEnv(t)
		e.host.init = true
		e.host.credTTL = ttl
		c := dial(t, enclavetest.Start(t, e.config(), 0))
		c.waitServing(t) // GenerateDataKey
		for range 3 {
			if _, err := c.admin.CreateKey(ctx(t), &pb.CreateKeyRequest{KeyType: pb.KeyType_KEY_TYPE_ED25519}); err != nil {
				t.Fatal(err)
			}
		}
		e.host.mu.Lock()
		defer e.host.mu.Unlock()
		return e.host.creds
	}
	if n := fetches(time.Hour); n != 1 {
		t.Fatalf("credentials with an hour left fetched %d times for 4 KMS calls, want once", n)
	}
	if n := fetches(4 * time.Minute); n < 4 {
		t.Fatalf("credentials with 4 minutes left fetched %d times for 4 KMS calls, want again before each (they expire within 5 minutes)", n)
	}
}
