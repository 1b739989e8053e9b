package stats_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/enclave/stats"
	"github.com/nitrosign/nitrosign/internal/enclavetest"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func ctxT(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// The real enclave graph counts known traffic and serves it over GetStats.
func TestEnclaveCounts(t *testing.T) {
	e := enclavetest.Start(t, enclavetest.DefaultConfig(), 0)
	cc, err := grpc.NewClient("passthrough:///"+e.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	signer := pb.NewSignerServiceClient(cc)
	sign := func(kt pb.KeyType, alg pb.SigningAlgorithm) error {
		_, err := signer.Sign(ctxT(t), &pb.SignRequest{
			Key:              &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: kt}},
			Message:          []byte("hello"),
			MessageType:      pb.MessageType_MESSAGE_TYPE_RAW,
			SigningAlgorithm: alg,
		})
		return err
	}
	for range 2 {
		if err := sign(pb.KeyType_KEY_TYPE_ECC, pb.SigningAlgorithm_SIGNING_ALGORITHM_UNSPECIFIED); err != nil {
			t.Fatal(err)
		}
	}
	if err := sign(pb.KeyType_KEY_TYPE_RSA, pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_256); err != nil {
		t.Fatal(err)
	}
	if err := sign(pb.KeyType_KEY_TYPE_ECC, pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_256); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("ECC key with an RSA algorithm: %v", err)
	}
	if _, err := pb.NewAttestationServiceClient(cc).Attest(ctxT(t), &pb.AttestRequest{Nonce: []byte("n")}); err != nil {
		t.Fatal(err)
	}

	got, err := pb.NewStatsServiceClient(cc).GetStats(ctxT(t), &pb.GetStatsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	calls := map[[2]string]uint64{}
	for _, c := range got.GetCalls() {
		calls[[2]string{c.GetMethod(), c.GetCode()}] = c.GetCount()
	}
	wantCalls := map[[2]string]uint64{
		{pb.SignerService_Sign_FullMethodName, "OK"}:              3,
		{pb.SignerService_Sign_FullMethodName, "InvalidArgument"}: 1,
		{pb.AttestationService_Attest_FullMethodName, "OK"}:       1,
	}
	for k, want := range wantCalls {
		if calls[k] != want {
			t.Errorf("calls %v = %d, want %d (all: %v)", k, calls[k], want, calls)
		}
	}
	sigs := map[pb.SigningAlgorithm]uint64{}
	for _, s := range got.GetSignatures() {
		sigs[s.GetAlgorithm()] = s.GetCount()
	}
	wantSigs := map[pb.SigningAlgorithm]uint64{
		pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256:      2,
		pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_256: 1,
	}
	if len(sigs) != len(wantSigs) {
		t.Errorf("signatures %v, want %v", sigs, wantSigs)
	}
	for a, want := range wantSigs {
		if sigs[a] != want {
			t.Errorf("signatures %v = %d, want %d", a, sigs[a], want)
		}
	}
	nsm := map[string]uint64{}
	for _, n := range got.GetNsmCalls() {
		if n.GetError() {
			t.Errorf("NSM %s failed %d times", n.GetOperation(), n.GetCount())
		}
		nsm[n.GetOperation()] = n.GetCount()
	}
	// Start-up: one seed, one cached document; then one fresh document
	// for the nonce.
	if nsm[stats.OpSeedEntropy] != 1 || nsm[stats.OpAttestation] != 2 {
		t.Errorf("NSM calls %v, want seed_entropy 1 and attestation 2", nsm)
	}
	if len(got.GetKeyGenerations()) != 3 {
		t.Fatalf("key generations %v, want RSA, ECC and Ed25519", got.GetKeyGenerations())
	}
	for _, k := range got.GetKeyGenerations() {
		if d := k.GetDuration().AsDuration(); d <= 0 || d > time.Minute || k.GetKeyId() == "" {
			t.Errorf("key generation %v: implausible", k)
		}
	}
	if st := got.GetStartTime().AsTime(); st.IsZero() || st.After(time.Now()) {
		t.Errorf("start time %v", st)
	}
}

func TestObserveKeys(t *testing.T) {
	keys := []*pb.KeyInfo{
		{KeyId: "a", KeyType: pb.KeyType_KEY_TYPE_RSA},
		{KeyId: "b", KeyType: pb.KeyType_KEY_TYPE_ECC},
	}
	want := map[string]time.Duration{"a": 2 * time.Second, "b": 500 * time.Millisecond}
	s := stats.New()
	s.ObserveKeys(keys, want)
	got := s.Snapshot().GetKeyGenerations()
	if len(got) != 2 {
		t.Fatalf("got %v", got)
	}
	for _, k := range got {
		if d := k.GetDuration().AsDuration(); d != want[k.GetKeyId()] {
			t.Errorf("key %s: %v, want %v", k.GetKeyId(), d, want[k.GetKeyId()])
		}
	}
}

type fakeNSM struct{ err error }

func (f fakeNSM) Attestation(_, _, _ []byte) ([]byte, error) { return []byte("doc"), f.err }
func (f fakeNSM) Random(p []byte) error                      { return f.err }
func (f fakeNSM) Close() error                               { return nil }

type fakeSimNSM struct{ fakeNSM }

func (fakeSimNSM) DevRootDER() []byte { return []byte("root") }

func TestWrapNSM(t *testing.T) {
	s := stats.New()
	plain := s.WrapNSM(fakeNSM{})
	if _, ok := plain.(attest.Simulation); ok {
		t.Fatal("a genuine NSM wrapped looks simulated")
	}
	sim := s.WrapNSM(fakeSimNSM{})
	if r, ok := sim.(attest.Simulation); !ok || string(r.DevRootDER()) != "root" {
		t.Fatal("a simulated NSM wrapped lost its dev root")
	}
	failing := s.WrapNSM(fakeNSM{err: errors.New("ioctl")})
	_, _ = plain.Attestation(nil, nil, nil)
	_, _ = sim.Attestation(nil, nil, nil)
	_, _ = failing.Attestation(nil, nil, nil)
	_ = failing.Random(make([]byte, 1))
	got := map[[2]any]uint64{}
	for _, n := range s.Snapshot().GetNsmCalls() {
		got[[2]any{n.GetOperation(), n.GetError()}] = n.GetCount()
	}
	want := map[[2]any]uint64{{stats.OpAttestation, false}: 2, {stats.OpAttestation, true}: 1, {stats.OpRandom, true}: 1}
	if len(got) != len(want) {
		t.Fatalf("NSM calls %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%v = %d, want %d", k, got[k], v)
		}
	}
}
