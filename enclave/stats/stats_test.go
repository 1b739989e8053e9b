package stats_test

import (
	"context"
	"errors"
	"maps"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	grpcstats "google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/enclave/enclavetest"
	"github.com/nitrosign/nitrosign/enclave/server"
	"github.com/nitrosign/nitrosign/enclave/stats"
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
	// Calls grpc-go answers before any interceptor runs are counted too.
	if _, err := pb.NewEchoServiceClient(cc).Echo(ctxT(t), &pb.EchoRequest{Payload: make([]byte, server.DefaultMaxRecvMsgSize+1)}); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("oversized Echo: %v", err)
	}
	if err := cc.Invoke(ctxT(t), "/nitrosign.v1.SignerService/Destroy", &pb.ListKeysRequest{}, &pb.ListKeysResponse{}); status.Code(err) != codes.Unimplemented {
		t.Fatalf("unknown method: %v", err)
	}

	wantCalls := map[[2]string]uint64{
		{pb.SignerService_Sign_FullMethodName, "OK"}:              3,
		{pb.SignerService_Sign_FullMethodName, "InvalidArgument"}: 1,
		{pb.AttestationService_Attest_FullMethodName, "OK"}:       1,
		{pb.EchoService_Echo_FullMethodName, "ResourceExhausted"}: 1,
		{stats.UnknownMethod, "Unimplemented"}:                    1,
	}
	// A call is counted just after its answer is written: poll until the
	// last one shows. GetStats counts itself; nothing else may show.
	ctx := ctxT(t)
	var got *pb.GetStatsResponse
	for {
		var err error
		got, err = pb.NewStatsServiceClient(cc).GetStats(ctx, &pb.GetStatsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		calls := map[[2]string]uint64{}
		for _, c := range got.GetCalls() {
			if c.GetMethod() != pb.StatsService_GetStats_FullMethodName {
				calls[[2]string{c.GetMethod(), c.GetCode()}] = c.GetCount()
			}
		}
		if maps.Equal(calls, wantCalls) {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("calls %v, want %v", calls, wantCalls)
		case <-time.After(time.Millisecond):
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

// services is a server's registered services, for Handler.
func services() map[string]grpc.ServiceInfo {
	return map[string]grpc.ServiceInfo{
		"a.Svc": {Methods: []grpc.MethodInfo{{Name: "Unary"}, {Name: "Watch", IsServerStream: true}}},
	}
}

// TestHandler drives the stats handler with the events grpc-go sends a
// server's call: each call is counted once, by method and code; a method
// not registered is counted as UnknownMethod at once; events that are not
// a server's End count nothing.
func TestHandler(t *testing.T) {
	type call struct {
		method string // "" sends the events on a context TagRPC did not return
		events []grpcstats.RPCStats
	}
	end := func(err error) *grpcstats.End { return &grpcstats.End{Error: err} }
	tests := []struct {
		name  string
		calls []call
		want  map[[2]string]uint64
	}{
		{"ok", []call{{"/a.Svc/Unary", []grpcstats.RPCStats{&grpcstats.Begin{}, &grpcstats.InPayload{}, &grpcstats.OutPayload{}, &grpcstats.OutTrailer{}, end(nil)}}},
			map[[2]string]uint64{{"/a.Svc/Unary", "OK"}: 1}},
		{"status", []call{{"/a.Svc/Watch", []grpcstats.RPCStats{&grpcstats.Begin{}, end(status.Error(codes.Canceled, "bye"))}}},
			map[[2]string]uint64{{"/a.Svc/Watch", "Canceled"}: 1}},
		{"answered by grpc-go before the handler", []call{{"/a.Svc/Unary", []grpcstats.RPCStats{&grpcstats.Begin{}, end(status.Error(codes.ResourceExhausted, "too big"))}}},
			map[[2]string]uint64{{"/a.Svc/Unary", "ResourceExhausted"}: 1}},
		{"not a status", []call{{"/a.Svc/Unary", []grpcstats.RPCStats{end(errors.New("plain"))}}},
			map[[2]string]uint64{{"/a.Svc/Unary", "Unknown"}: 1}},
		{"code beyond the standard ones", []call{{"/a.Svc/Unary", []grpcstats.RPCStats{end(status.Error(codes.Code(99), "odd"))}}},
			map[[2]string]uint64{{"/a.Svc/Unary", "Unknown"}: 1}},
		{"unknown methods fold into one", []call{{"/a.Svc/Nope", nil}, {"/b.Svc/Unary", nil}, {"/" + strings.Repeat("x", 1000), nil}},
			map[[2]string]uint64{{stats.UnknownMethod, "Unimplemented"}: 3}},
		{"unknown method with an End is not counted twice", []call{{"/a.Svc/Nope", []grpcstats.RPCStats{&grpcstats.Begin{}, end(status.Error(codes.Unimplemented, "nope"))}}},
			map[[2]string]uint64{{stats.UnknownMethod, "Unimplemented"}: 1}},
		{"a client's End", []call{{"/a.Svc/Unary", []grpcstats.RPCStats{&grpcstats.End{Client: true}}}}, map[[2]string]uint64{}},
		{"no End", []call{{"/a.Svc/Unary", []grpcstats.RPCStats{&grpcstats.Begin{}, &grpcstats.InHeader{}, &grpcstats.OutHeader{}}}}, map[[2]string]uint64{}},
		{"an End on an untagged context", []call{{"", []grpcstats.RPCStats{end(nil)}}}, map[[2]string]uint64{}},
		{"many", []call{
			{"/a.Svc/Unary", []grpcstats.RPCStats{end(nil)}},
			{"/a.Svc/Unary", []grpcstats.RPCStats{end(nil)}},
			{"/a.Svc/Unary", []grpcstats.RPCStats{end(status.Error(codes.InvalidArgument, "no"))}},
			{"/zzz/Unary", nil},
		}, map[[2]string]uint64{{"/a.Svc/Unary", "OK"}: 2, {"/a.Svc/Unary", "InvalidArgument"}: 1, {stats.UnknownMethod, "Unimplemented"}: 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := ctxT(t)
			s := stats.New()
			h := s.Handler(services)
			for _, c := range tt.calls {
				cctx := ctx
				if c.method != "" {
					cctx = h.TagRPC(ctx, &grpcstats.RPCTagInfo{FullMethodName: c.method})
				}
				for _, e := range c.events {
					h.HandleRPC(cctx, e)
				}
			}
			got := map[[2]string]uint64{}
			for _, c := range s.Snapshot().GetCalls() {
				got[[2]string{c.GetMethod(), c.GetCode()}] = c.GetCount()
			}
			if !maps.Equal(got, tt.want) {
				t.Fatalf("calls %v, want %v", got, tt.want)
			}
		})
	}
}

// The registered methods are read once, at the first call (not before: a
// service may still be registered until the server serves), and the
// counts of two servers add up.
func TestHandlerServices(t *testing.T) {
	ctx := ctxT(t)
	s := stats.New()
	var read int
	h1 := s.Handler(func() map[string]grpc.ServiceInfo { read++; return services() })
	h2 := s.Handler(services)
	if got := s.Snapshot().GetCalls(); len(got) != 0 || read != 0 {
		t.Fatalf("before any call: %v, services read %d times", got, read)
	}
	for _, h := range []*stats.Handler{h1, h1, h2} {
		h.HandleRPC(h.TagRPC(ctx, &grpcstats.RPCTagInfo{FullMethodName: "/a.Svc/Unary"}), &grpcstats.End{})
	}
	if read != 1 {
		t.Fatalf("services read %d times, want once", read)
	}
	got := s.Snapshot().GetCalls()
	if len(got) != 1 || got[0].GetMethod() != "/a.Svc/Unary" || got[0].GetCode() != "OK" || got[0].GetCount() != 3 {
		t.Fatalf("calls %v, want /a.Svc/Unary OK 3", got)
	}
}

// BenchmarkHandler is the stats handler's own cost of one unary call: the
// events grpc-go sends it (allocated by grpc-go, here once) and the count.
//
//	go test -run '^$' -bench Handler -benchmem ./enclave/stats/
func BenchmarkHandler(b *testing.B) {
	h := stats.New().Handler(services)
	ctx := context.Background()
	info := &grpcstats.RPCTagInfo{FullMethodName: "/a.Svc/Unary"}
	events := []grpcstats.RPCStats{&grpcstats.InHeader{}, &grpcstats.Begin{}, &grpcstats.InPayload{}, &grpcstats.OutHeader{}, &grpcstats.OutPayload{}, &grpcstats.OutTrailer{}, &grpcstats.End{}}
	call := func() {
		cctx := h.TagRPC(ctx, info)
		for _, e := range events {
			h.HandleRPC(cctx, e)
		}
	}
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			call()
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				call()
			}
		})
	})
}
