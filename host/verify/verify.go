// Package verify checks AWS Nitro Enclaves attestation documents: the
// COSE_Sign1 envelope, the payload's fields, the certificate chain up to a
// trusted root (by default the embedded AWS Nitro Enclaves Root-G1), the ES384
// signature, and the caller's expectations (nonce, PCRs, production mode, and
// the nitrosign key commitment in user_data, see internal/keycommit).
//
// The same code verifies documents from the simulated NSM of a development
// enclave; only the root differs (AttestResponse.simulated_root_certificate),
// and it must be passed explicitly in Options.Root.
//
// Every error wraps exactly one of the exported sentinels, so callers can
// tell why a document was refused with errors.Is. Verify never panics.
package verify

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/fxamacker/cbor/v2"
	"github.com/veraison/go-cose"

	"github.com/nitrosign/nitrosign/internal/keycommit"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

const (
	// MaxDocumentSize bounds the input before any parsing. The NSM answers
	// in at most 12 KiB (hf/nsm maxResponseSize), document and framing
	// included; a genuine document is about 4.5 KiB.
	MaxDocumentSize = 16 << 10
	// MaxOptionalField bounds public_key, user_data and nonce, as the NSM
	// specification does.
	MaxOptionalField = 1024
	// maxPCRs is the number of PCRs an NSM has (DescribeNSM max_pcrs).
	maxPCRs = 32
)

var (
	// ErrMalformed: the input is not a COSE_Sign1 ES384 document carrying a
	// well-formed NSM payload (bad CBOR, missing or mistyped field, wrong
	// algorithm header, unparsable certificate).
	ErrMalformed = errors.New("verify: malformed attestation document")
	// ErrFieldTooLarge: the document, or one of its public_key, user_data
	// and nonce fields, exceeds its size limit.
	ErrFieldTooLarge = errors.New("verify: attestation document field too large")
	// ErrChain: the certificates do not chain to the trusted root (for a
	// reason other than validity dates).
	ErrChain = errors.New("verify: certificate chain does not lead to the trusted root")
	// ErrExpired: a certificate of the chain is outside its validity period
	// at the verification time. Genuine leaf certificates live about three
	// hours, so an old document fails with this error, not ErrChain.
	ErrExpired = errors.New("verify: certificate expired or not yet valid at verification time")
	// ErrSignature: the COSE signature does not verify with the leaf key.
	ErrSignature = errors.New("verify: document signature invalid")
	// ErrNonce: the document's nonce is not the expected one.
	ErrNonce = errors.New("verify: nonce mismatch")
	// ErrPCRMismatch: an expected PCR is missing or differs.
	ErrPCRMismatch = errors.New("verify: PCR mismatch")
	// ErrDebugPCRs: PCR0, PCR1 or PCR2 is all zero, the mark of an enclave
	// started in debug mode, whose memory the parent instance can read.
	ErrDebugPCRs = errors.New("verify: all-zero PCRs (debug-mode enclave)")
	// ErrKeyCommitment: user_data is not the commitment to the given keys
	// and user data, or the key list itself is invalid.
	ErrKeyCommitment = errors.New("verify: key commitment mismatch")
)

// Options says what to verify against. The zero value verifies against the
// AWS root at the current time and checks no nonce, PCR or key.
type Options struct {
	// Root is the trust anchor. Nil: the embedded AWS Nitro Enclaves
	// Root-G1. Set it only to a root obtained out of band (e.g. the dev
	// root of a simulated NSM you started yourself).
	Root *x509.Certificate
	// Time is when certificate validity is checked. Zero: time.Now().
	Time time.Time
	// Nonce, when non-nil, must equal the document's nonce byte for byte
	// (an empty non-nil slice requires an absent or empty nonce).
	Nonce []byte
	// PCRs maps a PCR index to its expected value; each must be present
	// and equal.
	PCRs map[uint][]byte
	// AllowDebug accepts all-zero PCR0..2 (debug-mode enclaves). Never set
	// it in production: a debug enclave's memory is readable by the host.
	AllowDebug bool
	// Keys and UserData: when Keys or UserData is non-nil, or
	// RequireKeyCommitment is set, the document's user_data must equal
	// keycommit.Compute(Keys, UserData).
	Keys     []*pb.KeyInfo
	UserData []byte
	// Policy, when not empty, is the caller policy the commitment must
	// include (version 2: AttestResponse.policy); empty: version 1.
	Policy []byte
	// RequireKeyCommitment makes the key check unconditional, so that a
	// key list emptied in transit (a nil repeated field) fails instead of
	// skipping the check. Set it whenever you will trust keys from the
	// response.
	RequireKeyCommitment bool
}

// Document is a verified attestation document.
type Document struct {
	ModuleID  string
	Timestamp time.Time
	Digest    string
	// PCRs maps index to value (48 bytes for SHA384).
	PCRs map[uint][]byte
	// PublicKey, UserData and Nonce are nil when the NSM left them empty.
	PublicKey []byte
	UserData  []byte
	Nonce     []byte
	// Certificate is the leaf that signed the document.
	Certificate *x509.Certificate
	// CABundle is the document's cabundle, root first, as sent.
	CABundle []*x509.Certificate
	// Raw is the whole document, Payload the signed CBOR map.
	Raw     []byte
	Payload []byte
}

// payloadDecMode decodes the signed map. Indefinite-length items must be
// accepted: NSM documents since about 2025-09 encode the map as 0xbf...0xff.
// Duplicate keys are refused so that no field can be read two ways.
var payloadDecMode, errPayloadDecMode = cbor.DecOptions{
	DupMapKey:        cbor.DupMapKeyEnforcedAPF,
	IndefLength:      cbor.IndefLengthAllowed,
	MaxNestedLevels:  8,
	MaxArrayElements: 256,
	MaxMapPairs:      256,
}.DecMode()

// Verify checks doc as described in the package documentation and returns
// its contents. Checks run in this order: size, envelope, payload fields,
// signature, chain, nonce, PCRs, debug mode, key commitment.
func Verify(doc []byte, opts Options) (*Document, error) {
	if len(doc) == 0 {
		return nil, fmt.Errorf("%w: empty input", ErrMalformed)
	}
	if len(doc) > MaxDocumentSize {
		return nil, fmt.Errorf("%w: document is %d bytes, limit %d", ErrFieldTooLarge, len(doc), MaxDocumentSize)
	}
	root := opts.Root
	if root == nil {
		var err error
		if root, err = AWSRoot(); err != nil {
			return nil, err
		}
	}
	at := opts.Time
	if at.IsZero() {
		at = time.Now()
	}

	msg, err := parseSign1(doc)
	if err != nil {
		return nil, err
	}
	d, err := parsePayload(msg.Payload)
	if err != nil {
		return nil, err
	}
	d.Raw = bytes.Clone(doc)

	// The signature is checked before the chain, with the not yet trusted
	// leaf key: any change to the signed bytes then reports ErrSignature,
	// whichever bytes changed. Both must pass; the order only picks the
	// error.
	if err := verifySignature(msg, d.Certificate); err != nil {
		return nil, err
	}
	if err := verifyChain(d, root, at); err != nil {
		return nil, err
	}
	if err := checkExpectations(d, &opts); err != nil {
		return nil, err
	}
	return d, nil
}

// parseSign1 decodes the COSE_Sign1 envelope (untagged as the NSM sends it,
// or with tag 18) and checks that its headers are exactly {1: -35} and {}.
func parseSign1(doc []byte) (*cose.Sign1Message, error) {
	var msg cose.Sign1Message
	var err error
	if doc[0] == 0xd2 { // tag 18, COSE_Sign1_Tagged
		err = msg.UnmarshalCBOR(doc)
	} else {
		err = (*cose.UntaggedSign1Message)(&msg).UnmarshalCBOR(doc)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: COSE_Sign1: %w", ErrMalformed, err)
	}
	alg, err := msg.Headers.Protected.Algorithm()
	if err != nil || alg != cose.AlgorithmES384 || len(msg.Headers.Protected) != 1 {
		return nil, fmt.Errorf("%w: protected header must be exactly {alg: ES384}", ErrMalformed)
	}
	// The NSM sends an empty unprotected map. Refusing anything else keeps
	// documents non-malleable: unsigned bytes could otherwise be changed
	// without invalidating the signature.
	if len(msg.Headers.Unprotected) != 0 {
		return nil, fmt.Errorf("%w: unprotected header must be empty", ErrMalformed)
	}
	if len(msg.Payload) == 0 {
		return nil, fmt.Errorf("%w: empty payload", ErrMalformed)
	}
	return &msg, nil
}

// parsePayload decodes and type-checks the NSM attestation map.
func parsePayload(payload []byte) (*Document, error) {
	if errPayloadDecMode != nil { // constant options: unreachable
		return nil, fmt.Errorf("%w: CBOR decoder: %w", ErrMalformed, errPayloadDecMode)
	}
	var fields map[string]cbor.RawMessage
	if err := payloadDecMode.Unmarshal(payload, &fields); err != nil {
		return nil, fmt.Errorf("%w: payload: %w", ErrMalformed, err)
	}
	required := func(name string) (cbor.RawMessage, error) {
		raw, ok := fields[name]
		if !ok {
			return nil, fmt.Errorf("%w: payload has no %s", ErrMalformed, name)
		}
		return raw, nil
	}
	d := &Document{Payload: payload}
	var err error

	raw, err := required("module_id")
	if err != nil {
		return nil, err
	}
	if d.ModuleID, err = decodeText(raw); err != nil || d.ModuleID == "" {
		return nil, fmt.Errorf("%w: module_id must be a non-empty text string", ErrMalformed)
	}

	if raw, err = required("digest"); err != nil {
		return nil, err
	}
	if d.Digest, err = decodeText(raw); err != nil || d.Digest != "SHA384" {
		return nil, fmt.Errorf("%w: digest must be \"SHA384\"", ErrMalformed)
	}

	if raw, err = required("timestamp"); err != nil {
		return nil, err
	}
	ms, err := decodeUint(raw)
	if err != nil || ms == 0 || ms > math.MaxInt64 {
		return nil, fmt.Errorf("%w: timestamp must be a positive integer of milliseconds", ErrMalformed)
	}
	d.Timestamp = time.UnixMilli(int64(ms)).UTC()

	if raw, err = required("pcrs"); err != nil {
		return nil, err
	}
	if d.PCRs, err = decodePCRs(raw); err != nil {
		return nil, err
	}

	if raw, err = required("certificate"); err != nil {
		return nil, err
	}
	leafDER, err := decodeBytes(raw)
	if err != nil || len(leafDER) == 0 {
		return nil, fmt.Errorf("%w: certificate must be a non-empty byte string", ErrMalformed)
	}
	if d.Certificate, err = x509.ParseCertificate(leafDER); err != nil {
		return nil, fmt.Errorf("%w: certificate: %w", ErrMalformed, err)
	}

	if raw, err = required("cabundle"); err != nil {
		return nil, err
	}
	if d.CABundle, err = decodeCABundle(raw); err != nil {
		return nil, err
	}

	for _, f := range []struct {
		name string
		dst  *[]byte
	}{{"public_key", &d.PublicKey}, {"user_data", &d.UserData}, {"nonce", &d.Nonce}} {
		if *f.dst, err = decodeOptional(f.name, fields[f.name]); err != nil {
			return nil, err
		}
	}
	return d, nil
}

func decodePCRs(raw cbor.RawMessage) (map[uint][]byte, error) {
	if majorType(raw) != 5 {
		return nil, fmt.Errorf("%w: pcrs must be a map", ErrMalformed)
	}
	var m map[uint64]cbor.RawMessage
	if err := payloadDecMode.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("%w: pcrs: %w", ErrMalformed, err)
	}
	if len(m) == 0 || len(m) > maxPCRs {
		return nil, fmt.Errorf("%w: pcrs has %d entries, want 1 to %d", ErrMalformed, len(m), maxPCRs)
	}
	pcrs := make(map[uint][]byte, len(m))
	for i, v := range m {
		if i >= maxPCRs {
			return nil, fmt.Errorf("%w: PCR index %d out of range", ErrMalformed, i)
		}
		b, err := decodeBytes(v)
		if err != nil {
			return nil, fmt.Errorf("%w: PCR%d is not a byte string", ErrMalformed, i)
		}
		switch len(b) {
		case 32, 48, 64:
		default:
			return nil, fmt.Errorf("%w: PCR%d is %d bytes, want 32, 48 or 64", ErrMalformed, i, len(b))
		}
		pcrs[uint(i)] = b
	}
	if _, ok := pcrs[0]; !ok {
		return nil, fmt.Errorf("%w: pcrs has no PCR0", ErrMalformed)
	}
	return pcrs, nil
}

func decodeCABundle(raw cbor.RawMessage) ([]*x509.Certificate, error) {
	if majorType(raw) != 4 {
		return nil, fmt.Errorf("%w: cabundle must be an array", ErrMalformed)
	}
	var items []cbor.RawMessage
	if err := payloadDecMode.Unmarshal(raw, &items); err != nil {
		return nil, fmt.Errorf("%w: cabundle: %w", ErrMalformed, err)
	}
	if len(items) == 0 {
		return nil, fmt.Errorf("%w: cabundle is empty", ErrMalformed)
	}
	certs := make([]*x509.Certificate, len(items))
	for i, item := range items {
		der, err := decodeBytes(item)
		if err != nil || len(der) == 0 {
			return nil, fmt.Errorf("%w: cabundle[%d] must be a non-empty byte string", ErrMalformed, i)
		}
		if certs[i], err = x509.ParseCertificate(der); err != nil {
			return nil, fmt.Errorf("%w: cabundle[%d]: %w", ErrMalformed, i, err)
		}
	}
	return certs, nil
}

// decodeOptional decodes public_key, user_data or nonce: absent, null or a
// byte string of at most MaxOptionalField bytes. Empty comes back as nil.
func decodeOptional(name string, raw cbor.RawMessage) ([]byte, error) {
	if raw == nil || bytes.Equal(raw, []byte{0xf6}) {
		return nil, nil
	}
	b, err := decodeBytes(raw)
	if err != nil {
		return nil, fmt.Errorf("%w: %s must be a byte string or null", ErrMalformed, name)
	}
	if len(b) > MaxOptionalField {
		return nil, fmt.Errorf("%w: %s is %d bytes, limit %d", ErrFieldTooLarge, name, len(b), MaxOptionalField)
	}
	if len(b) == 0 {
		return nil, nil
	}
	return b, nil
}

// majorType returns the CBOR major type of an item, or -1 for no item.
func majorType(raw cbor.RawMessage) int {
	if len(raw) == 0 {
		return -1
	}
	return int(raw[0] >> 5)
}

// The decode helpers check the major type first: fxamacker/cbor would
// otherwise convert, e.g., a byte string into a Go string.

func decodeText(raw cbor.RawMessage) (string, error) {
	if majorType(raw) != 3 {
		return "", errors.New("not a text string")
	}
	var s string
	err := payloadDecMode.Unmarshal(raw, &s)
	return s, err
}

func decodeBytes(raw cbor.RawMessage) ([]byte, error) {
	if majorType(raw) != 2 {
		return nil, errors.New("not a byte string")
	}
	var b []byte
	err := payloadDecMode.Unmarshal(raw, &b)
	return b, err
}

func decodeUint(raw cbor.RawMessage) (uint64, error) {
	if majorType(raw) != 0 {
		return 0, errors.New("not an unsigned integer")
	}
	var n uint64
	err := payloadDecMode.Unmarshal(raw, &n)
	return n, err
}

// verifyChain checks that the leaf chains to root at time at. Only root is
// trusted: the bundle's own root (cabundle[0]) is never used as an anchor.
// AWS puts the root first, so intermediates are cabundle[1:]; a cabundle[0]
// that is not byte-identical to root is offered as an intermediate too (it
// could be a cross-signed root), which grants it no trust of its own.
func verifyChain(d *Document, root *x509.Certificate, at time.Time) error {
	roots := x509.NewCertPool()
	roots.AddCert(root)
	intermediates := x509.NewCertPool()
	for i, c := range d.CABundle {
		if i == 0 && c.Equal(root) {
			continue
		}
		intermediates.AddCert(c)
	}
	_, err := d.Certificate.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: intermediates,
		CurrentTime:   at,
		// Nitro certificates carry no extended key usage.
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		// x509 reports an expired leaf as CertificateInvalidError, but an
		// expired intermediate only as UnknownAuthorityError with a hidden
		// hint, so check the dates of the claimed chain (leaf and cabundle,
		// which holds the root when it is the trusted one) ourselves.
		var invalid x509.CertificateInvalidError
		if errors.As(err, &invalid) && invalid.Reason == x509.Expired {
			return fmt.Errorf("%w: %w", ErrExpired, err)
		}
		for _, c := range append([]*x509.Certificate{d.Certificate}, d.CABundle...) {
			if at.Before(c.NotBefore) || at.After(c.NotAfter) {
				return fmt.Errorf("%w: %q valid %s to %s, checked at %s", ErrExpired, c.Subject.CommonName,
					c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339), at.UTC().Format(time.RFC3339Nano))
			}
		}
		return fmt.Errorf("%w: %w", ErrChain, err)
	}
	return nil
}

// verifySignature checks the ES384 signature (raw r||s, 96 bytes) over
// Sig_structure ["Signature1", protected, h”, payload] with the leaf's key.
// go-cose uses crypto/ecdsa.Verify, which accepts high-S signatures; about
// half of genuine NSM signatures are high-S, so this must stay so.
func verifySignature(msg *cose.Sign1Message, leaf *x509.Certificate) error {
	pub, ok := leaf.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P384() {
		return fmt.Errorf("%w: leaf key is %T, want ECDSA P-384", ErrSignature, leaf.PublicKey)
	}
	v, err := cose.NewVerifier(cose.AlgorithmES384, pub)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrSignature, err)
	}
	if err := msg.Verify(nil, v); err != nil {
		return fmt.Errorf("%w: %w", ErrSignature, err)
	}
	return nil
}

func checkExpectations(d *Document, opts *Options) error {
	if opts.Nonce != nil && !bytes.Equal(d.Nonce, opts.Nonce) {
		return fmt.Errorf("%w: document nonce is %d bytes and differs from the expected %d bytes",
			ErrNonce, len(d.Nonce), len(opts.Nonce))
	}
	indices := make([]uint, 0, len(opts.PCRs))
	for i := range opts.PCRs {
		indices = append(indices, i)
	}
	slices.Sort(indices)
	for _, i := range indices {
		got, ok := d.PCRs[i]
		if !ok {
			return fmt.Errorf("%w: document has no PCR%d", ErrPCRMismatch, i)
		}
		if !bytes.Equal(got, opts.PCRs[i]) {
			return fmt.Errorf("%w: PCR%d is %x, want %x", ErrPCRMismatch, i, got, opts.PCRs[i])
		}
	}
	if !opts.AllowDebug {
		for i := uint(0); i <= 2; i++ {
			if v, ok := d.PCRs[i]; ok && allZero(v) {
				return fmt.Errorf("%w: PCR%d is all zero; set AllowDebug only for development", ErrDebugPCRs, i)
			}
		}
	}
	if opts.Keys != nil || opts.UserData != nil || opts.RequireKeyCommitment {
		var policySum []byte
		if len(opts.Policy) > 0 {
			sum := sha256.Sum256(opts.Policy)
			policySum = sum[:]
		}
		ok, err := keycommit.EqualWithPolicy(d.UserData, opts.Keys, policySum, opts.UserData)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrKeyCommitment, err)
		}
		if !ok {
			what := "the %d given keys and user data"
			if policySum != nil {
				what = "the %d given keys, the given policy and user data"
			}
			return fmt.Errorf("%w: user_data does not commit to "+what, ErrKeyCommitment, len(opts.Keys))
		}
	}
	return nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
