// The one error type the CLI shows to users: it names the file, the tensor and the problem.

export class PackkvError extends Error {
  constructor(
    message: string,
    readonly file?: string,
    readonly tensor?: string,
  ) {
    super(PackkvError.compose(message, file, tensor));
    this.name = 'PackkvError';
  }

  private static compose(message: string, file?: string, tensor?: string): string {
    const where = [file, tensor ? `tensor '${tensor}'` : undefined].filter(Boolean).join(', ');
    return where ? `${where}: ${message}` : message;
  }
}
