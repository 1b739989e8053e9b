package server

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"sync"
	"testing"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/nitrosign/nitrosign/enclave/signer"
	"github.com/nitrosign/nitrosign/internal/sigalg"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

var (
	fuzzOnce   sync.Once
	fuzzSigner *signer.Signer
	fuzzPubs   map[string]crypto.PublicKey
	fuzzErr    error
)

// fuzzKeys is one signer for every fuzz input (key generation is slow).
func fuzzKeys(tb testing.TB) (*signer.Signer, map[string]crypto.PublicKey) {
	tb.Helper()
	fuzzOnce.Do(func() {
		fuzzSigner, fuzzErr = signer.New(signer.Params{Config: signer.Config{Ed25519: true}, Logger: zap.NewNop()})
		if fuzzErr != nil {
			return
		}
		fuzzPubs = map[string]crypto.PublicKey{}
		for _, k := range fuzzSigner.Keys() {
			pub, err := x509.ParsePKIXPublicKey(k.GetPublicKey())
			if err != nil {
				fuzzErr = err
				return
			}
			fuzzPubs[k.GetKeyId()] = pub
		}
	})
	if fuzzErr != nil {
		tb.Fatal(fuzzErr)
	}
	return fuzzSigner, fuzzPubs
}

// decode runs data through the server's request codec and its malformed
// interceptor, as a request's bytes go on the wire: the message, or the
// status a malformed one is answered with.
func decode(data []byte, into proto.Message) error {
	if err := newRequestCodec().Unmarshal(mem.BufferSlice{mem.SliceBuffer(data)}, into); err != nil {
		return err
	}
	_, err := unaryMalformed(context.Background(), into, &grpc.UnaryServerInfo{}, func(context.Context, any) (any, error) { return nil, nil })
	return err
}

// callerCodes are the only codes a request's content may earn.
func callerCode(c codes.Code) bool { return c == codes.InvalidArgument || c == codes.NotFound }

// FuzzSignRequest feeds arbitrary bytes, as a request's wire bytes, through
// the enclave's request validation: the request codec, then the Signer and
// public key handlers with their status mapping. Every input must end in a
// caller's status (InvalidArgument or NotFound) whose message carries no
// message bytes, or in a signature that verifies against the key it names;
// never a panic, never Internal or Unknown.
//
//	go test -run='^$' -fuzz=FuzzSignRequest -fuzztime=30s ./enclave/server/
func FuzzSignRequest(f *testing.F) {
	sg, pubs := fuzzKeys(f)
	keys := sg.Keys()
	for _, req := range []*pb.SignRequest{
		{},
		{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_ECC}}, Message: []byte("m")},
		{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_ED25519}}, Message: []byte("m"), SigningAlgorithm: pb.SigningAlgorithm_SIGNING_ALGORITHM_ED25519_PH_SHA_512},
		{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_RSA}}, Message: make([]byte, 32), MessageType: pb.MessageType_MESSAGE_TYPE_DIGEST, SigningAlgorithm: pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_256},
		{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: keys[0].GetKeyId()}}, Message: make([]byte, 4096)},
		{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: "not hex"}}, Message: []byte("m")},
		{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: 99}}, Message: []byte("m"), MessageType: 9, SigningAlgorithm: 77},
	} {
		b, err := proto.Marshal(req)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{0x0a, 0xff})
	f.Add(bytes.Repeat([]byte{0xff}, 16))

	svc := &signerService{signer: sg, log: zap.NewNop()}
	f.Fuzz(func(t *testing.T, data []byte) {
		ctx := context.Background()
		req := new(pb.SignRequest)
		if err := decode(data, req); err != nil {
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("malformed request answered %v, want InvalidArgument", err)
			}
			return
		}
		resp, err := svc.Sign(ctx, req)
		if err != nil {
			st := status.Convert(err)
			if !callerCode(st.Code()) || st.Message() == "" {
				t.Fatalf("Sign(%v) = %v: want InvalidArgument or NotFound with a message", req, err)
			}
			if m := req.GetMessage(); len(m) >= 16 && bytes.Contains([]byte(st.Message()), m) {
				t.Fatalf("error message %q carries the message bytes", st.Message())
			}
		} else {
			pub, ok := pubs[resp.GetKeyId()]
			if !ok {
				t.Fatalf("signed with unknown key %q", resp.GetKeyId())
			}
			if err := sigalg.Verify(pub, resp.GetSigningAlgorithm(), req.GetMessageType(), req.GetMessage(), resp.GetSignature()); err != nil {
				t.Fatalf("signature of %v does not verify: %v", req, err)
			}
		}
		// The same bytes as a GetPublicKeyRequest (field 1 is the key
		// selector in both): a key, or a caller's status.
		pk := new(pb.GetPublicKeyRequest)
		if err := decode(data, pk); err != nil {
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("malformed GetPublicKey answered %v", err)
			}
			return
		}
		got, err := svc.GetPublicKey(ctx, pk)
		switch {
		case err != nil && !callerCode(status.Code(err)):
			t.Fatalf("GetPublicKey(%v) = %v", pk, err)
		case err == nil && pubs[got.GetKey().GetKeyId()] == nil:
			t.Fatalf("GetPublicKey(%v) returned an unknown key", pk)
		}
	})
}
