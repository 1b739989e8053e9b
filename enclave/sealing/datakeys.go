// Package sealing gets the enclave the data keys that seal its keyset, from
// AWS KMS, readable by this enclave only.
//
// Every call carries a Recipient: an attestation document from the NSM
// that holds a fresh, single-use RSA public key. KMS checks the document
// (and the key policy's conditions on its PCRs) and returns the data key
// encrypted to that public key, CiphertextForRecipient, never in clear; the
// enclave opens it with the private key, which never leaves this process
// (package recipient). The parent instance relays the calls, and so sees
// ciphertext and the KMS-encrypted blob only.
//
// KMS is reached through the official client, github.com/aws/aws-sdk-go-v2
// (its service/kms), never hand-written HTTP; where it runs (an enclave has
// no network, so its transport dials through the parent) is the client's
// configuration, not this package's.
package sealing

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/aws/smithy-go"

	"github.com/nitrosign/nitrosign/enclave/recipient"
)

// KMS is the part of the AWS KMS client the enclave uses; *kms.Client
// implements it.
type KMS interface {
	GenerateDataKey(ctx context.Context, in *kms.GenerateDataKeyInput, opts ...func(*kms.Options)) (*kms.GenerateDataKeyOutput, error)
	Decrypt(ctx context.Context, in *kms.DecryptInput, opts ...func(*kms.Options)) (*kms.DecryptOutput, error)
}

var _ KMS = (*kms.Client)(nil)

// Attester returns an attestation document that carries publicKey (DER
// SubjectPublicKeyInfo); attest.NSM implements it.
type Attester interface {
	Attestation(nonce, userData, publicKey []byte) ([]byte, error)
}

// DataKeySize is the size of a data key: AES-256.
const DataKeySize = 32

// EncryptionContext goes with every data key: KMS binds the blob to it
// (Decrypt needs the same), and the key policy can require it
// (kms:EncryptionContext:nitrosign:purpose), so blobs made for something
// else are not keysets' data keys.
var EncryptionContext = map[string]string{"nitrosign:purpose": "sealed-keyset"}

// recipientKeyBits is the size of the single-use RSA key KMS encrypts to.
const recipientKeyBits = 2048

// ErrKMS is wrapped by every error KMS answered (an API error: its code and
// message follow) or could not be reached for.
var ErrKMS = errors.New("sealing: AWS KMS")

// DataKeys gets data keys under one KMS key.
type DataKeys struct {
	kms   KMS
	nsm   Attester
	keyID string
}

// NewDataKeys uses client for the KMS key keyID (an ARN, or an alias ARN)
// and nsm for the attestation documents.
func NewDataKeys(client KMS, nsm Attester, keyID string) (*DataKeys, error) {
	switch {
	case client == nil:
		return nil, errors.New("sealing: no KMS client")
	case nsm == nil:
		return nil, errors.New("sealing: no attester")
	case keyID == "":
		return nil, errors.New("sealing: no KMS key id")
	}
	return &DataKeys{kms: client, nsm: nsm, keyID: keyID}, nil
}

// KeyID is the KMS key the data keys are generated under.
func (d *DataKeys) KeyID() string { return d.keyID }

// Generate returns a new data key, in clear for this enclave, the same key
// encrypted under the KMS key (CiphertextBlob), which is what is stored,
// and the ARN of the KMS key KMS used (KeyID may be an alias).
func (d *DataKeys) Generate(ctx context.Context) (key, blob []byte, keyARN string, err error) {
	r, priv, err := d.recipient()
	if err != nil {
		return nil, nil, "", err
	}
	out, err := d.kms.GenerateDataKey(ctx, &kms.GenerateDataKeyInput{
		KeyId:             aws.String(d.keyID),
		KeySpec:           types.DataKeySpecAes256,
		EncryptionContext: EncryptionContext,
		Recipient:         r,
	})
	if err != nil {
		return nil, nil, "", kmsError("GenerateDataKey", err)
	}
	if len(out.Plaintext) != 0 {
		clear(out.Plaintext)
		return nil, nil, "", fmt.Errorf("%w: GenerateDataKey returned the data key in clear despite the Recipient: refused", ErrKMS)
	}
	if len(out.CiphertextBlob) == 0 || aws.ToString(out.KeyId) == "" {
		return nil, nil, "", fmt.Errorf("%w: GenerateDataKey returned no CiphertextBlob or KeyId", ErrKMS)
	}
	key, err = open(out.CiphertextForRecipient, priv, "GenerateDataKey")
	if err != nil {
		return nil, nil, "", err
	}
	return key, out.CiphertextBlob, aws.ToString(out.KeyId), nil
}

// Open returns the data key that blob (from Generate) encrypts, and the
// ARN of the KMS key that opened it.
func (d *DataKeys) Open(ctx context.Context, blob []byte) ([]byte, string, error) {
	if len(blob) == 0 {
		return nil, "", errors.New("sealing: empty data key blob")
	}
	r, priv, err := d.recipient()
	if err != nil {
		return nil, "", err
	}
	out, err := d.kms.Decrypt(ctx, &kms.DecryptInput{
		CiphertextBlob:    blob,
		KeyId:             aws.String(d.keyID), // KMS refuses a blob of another key
		EncryptionContext: EncryptionContext,
		Recipient:         r,
	})
	if err != nil {
		return nil, "", kmsError("Decrypt", err)
	}
	if len(out.Plaintext) != 0 {
		clear(out.Plaintext)
		return nil, "", fmt.Errorf("%w: Decrypt returned the data key in clear despite the Recipient: refused", ErrKMS)
	}
	key, err := open(out.CiphertextForRecipient, priv, "Decrypt")
	if err != nil {
		return nil, "", err
	}
	return key, aws.ToString(out.KeyId), nil
}

// recipient makes a single-use RSA key and the attestation document that
// carries its public key.
func (d *DataKeys) recipient() (*types.RecipientInfo, *rsa.PrivateKey, error) {
	priv, err := rsa.GenerateKey(rand.Reader, recipientKeyBits)
	if err != nil {
		return nil, nil, fmt.Errorf("sealing: recipient key: %w", err)
	}
	spki, err := x509.MarshalPKIXPublicKey(&priv.PublicKey)
	if err != nil {
		return nil, nil, fmt.Errorf("sealing: recipient key: %w", err)
	}
	doc, err := d.nsm.Attestation(nil, nil, spki)
	if err != nil {
		return nil, nil, fmt.Errorf("sealing: attestation document for KMS: %w", err)
	}
	return &types.RecipientInfo{
		AttestationDocument:    doc,
		KeyEncryptionAlgorithm: types.KeyEncryptionMechanismRsaesOaepSha256,
	}, priv, nil
}

// open decrypts CiphertextForRecipient and checks the data key's size.
func open(env []byte, priv *rsa.PrivateKey, op string) ([]byte, error) {
	if len(env) == 0 {
		return nil, fmt.Errorf("%w: %s returned no CiphertextForRecipient", ErrKMS, op)
	}
	key, err := recipient.Decrypt(env, priv)
	if err != nil {
		return nil, fmt.Errorf("sealing: %s CiphertextForRecipient: %w", op, err)
	}
	if len(key) != DataKeySize {
		clear(key)
		return nil, fmt.Errorf("sealing: %s data key of %d bytes, want %d", op, len(key), DataKeySize)
	}
	return key, nil
}

// kmsError names what KMS answered: its error code and message (access
// denied by the key policy, a wrong key, a corrupt blob) or why it could
// not be reached.
func kmsError(op string, err error) error {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return fmt.Errorf("%w %s: %s: %s", ErrKMS, op, ae.ErrorCode(), ae.ErrorMessage())
	}
	return fmt.Errorf("%w %s: %w", ErrKMS, op, err)
}
